"""``gitlab-producer run`` with ``SYNC_OBJECTS=true`` as a real process against the simulator:
the backfill, then object rounds beside the event rounds. After edits, closes, merges, new
notes, deletions and a label-only edit, the next object round brings every latest version,
every new child and a tombstone per deleted object, and nothing twice."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from gitlab_producer.objects.streams import KINDS
from gitlab_producer.simulator.server import running_simulator
from gitlab_producer.simulator.world import WorldSpec
from tests.conftest import Broker, ServiceRun, consume, simulator_process
from tests.integration.backfill_truth import (
    Found,
    assert_matches,
    envelope_validator,
    from_file,
    ground_truth,
)
from tests.integration.test_backfill import engine_env, saq_keys, wait_for

__all__ = ["saq_keys"]  # a fixture of the engine test

pytestmark = pytest.mark.integration

# The history ends two hours before start-up (project activity is settled), few objects.
SPEC = WorldSpec(projects=4, users=10, events=120, history_days=1.0, seed=21, quiet_s=7200.0,
                 objects_per_project=30, feature_off_share=0.0)
PREFIX = "data-bus.gitlab"


def object_rounds(log: Path) -> list[dict[str, Any]]:
    if not log.exists():
        return []
    lines = [json.loads(line) for line in log.read_text().splitlines()
             if '"object_round_finished"' in line]
    return lines


def change(url: str, **body: Any) -> dict[str, Any]:
    answer = httpx.post(f"{url}/_simulator/changes", json=body, timeout=10)
    assert answer.status_code == 200, answer.text
    result: dict[str, Any] = answer.json()["changes"][0]
    return result


def change_somewhere(url: str, first: int, **body: Any) -> dict[str, Any]:
    """The change in the first project, from ``first`` on, where it applies."""
    for pid in [*range(first, SPEC.projects + 1), *range(1, first)]:
        answer = httpx.post(f"{url}/_simulator/changes", json={**body, "project_id": pid},
                            timeout=10)
        if answer.status_code == 200:
            result: dict[str, Any] = answer.json()["changes"][0]
            return result
    pytest.fail(f"no project where {body} applies")


def apply_changes(url: str) -> dict[str, Any]:
    """One of each: an edit (no event), a close and a merge (events), a new note (event), a
    label-only edit (no event, last_activity_at unmoved), a deleted note, issue and pipeline."""
    done = {
        "edit": change(url, kind="edit_issue", project_id=1),
        "close": change_somewhere(url, 2, kind="close_issue"),
        "merge": change_somewhere(url, 3, kind="merge_mr"),
        "note": change(url, kind="add_note", project_id=1, on="issue"),
        "label": change(url, kind="add_label", project_id=4, on="issue"),
        "delete_note": change(url, kind="delete_note", project_id=2),
    }
    # Not an issue the other changes touched.
    touched = {(r["project_id"], r["object"]["iid"]) for r in done.values()
               if r.get("object", {}).get("type") == "Issue"}
    truth = ground_truth(url)["projects"]
    pid, victim = next((int(p), row[1]) for p, d in truth.items() for row in d["issues"]
                       if (int(p), row[1]) not in touched and any(
                           n[1] == "Issue" and n[2] == row[1] for n in d["notes"]))
    done["delete_issue"] = change(url, kind="delete_issue", project_id=pid, iid=victim)
    pipelines = next((int(p), d["pipelines"]) for p, d in truth.items() if d["pipelines"])
    done["delete_pipeline"] = change(url, kind="delete_pipeline", project_id=pipelines[0],
                                     pipeline_id=pipelines[1][0][0])
    return done


OBJECT_TOPICS = {f"{PREFIX}.{kind}" for kind in KINDS}


def messages(path: Path) -> list[dict[str, Any]]:
    """The object records in the file sink (the event rounds write there too)."""
    return [m for m in map(json.loads, path.read_text().splitlines())
            if m["topic"] in OBJECT_TOPICS]


def latest(found: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The last record per key (what a compacted topic keeps)."""
    out: dict[str, dict[str, Any]] = {}
    for m in found:
        out[m["key"]] = m
    return out


def versions(found: list[dict[str, Any]]) -> set[tuple[str, str]]:
    return {(m["key"], m["headers"].get("updated_at") or m["headers"]["content_hash"])
            for m in found}


def check_after_changes(found: list[dict[str, Any]], url: str, done: dict[str, Any],
                        before: set[tuple[str, str]]) -> None:
    truth = ground_truth(url)
    last = latest(found)
    # every latest version: issues, merge requests and notes at GitLab's updated_at now
    for pid, data in truth["projects"].items():
        for kind in ("issues", "merge_requests"):
            for _id, iid, updated, _state in data[kind]:
                record = last[f"projects/{pid}/{kind}/{iid}"]
                assert record["headers"]["updated_at"] == updated, (kind, pid, iid)
        for note_id, noteable, iid, updated in data["notes"]:
            kind = "issues" if noteable == "Issue" else "merge_requests"
            record = last[f"projects/{pid}/{kind}/{iid}/notes/{note_id}"]
            assert record["headers"]["updated_at"] == updated
    # the new note arrived; the label-only edit arrived with its label
    note = done["note"]
    assert f"projects/1/issues/{note['object']['iid']}/notes/{note['note_id']}" in last
    labelled = last[f"projects/4/issues/{done['label']['object']['iid']}"]
    assert done["label"]["label"] in labelled["value"]["labels"]
    assert labelled["headers"]["op"] == "update"
    label_events = f"projects/4/issues/{done['label']['object']['iid']}/resource_label_events/"
    assert any(key.startswith(label_events) and (key, m["headers"]["content_hash"]) not in before
               for key, m in last.items())  # its new resource label event too
    # a tombstone per deleted object: the note, the issue and the issue's notes
    dn = done["delete_note"]
    kind = "issues" if dn["object"]["type"] == "Issue" else "merge_requests"
    gone_note = last[f"projects/2/{kind}/{dn['object']['iid']}/notes/{dn['note_id']}"]
    assert gone_note["value"] is None and gone_note["headers"]["op"] == "delete"
    di = done["delete_issue"]
    gone_issue = last[f"projects/{di['project_id']}/issues/{di['object']['iid']}"]
    assert gone_issue["value"] is None and gone_issue["headers"]["op"] == "delete"
    prefix = f"projects/{di['project_id']}/issues/{di['object']['iid']}/notes/"
    gone_notes = [m for k, m in last.items() if k.startswith(prefix)]
    assert gone_notes and all(m["value"] is None for m in gone_notes)
    dp = done["delete_pipeline"]
    gone_pipeline = last[f"projects/{dp['project_id']}/pipelines/{dp['object']['id']}"]
    assert gone_pipeline["value"] is None and gone_pipeline["headers"]["op"] == "delete"
    # live keys equal the ground truth (tombstoned keys are not live)
    live = Found()
    for m in found:
        live.add(m["topic"].removeprefix(PREFIX + "."), m["key"], m["headers"])
    live.keys = {k: {key for key in v if last[key]["value"] is not None}
                 for k, v in live.keys.items() if k in KINDS}
    assert_matches(live, truth)
    # nothing twice: no (key, version) produced twice, tombstones included
    assert [r for r in live.repeats() if r[0] in KINDS] == []
    validator = envelope_validator()
    new = [m for m in found if (m["key"], m["headers"].get("updated_at")
                                or m["headers"]["content_hash"]) not in before]
    assert new
    for m in found:
        validator.validate({"kind": m["topic"].removeprefix(PREFIX + "."), "key": m["key"],
                            "headers": m["headers"], "value": m["value"]})
    assert {m["headers"]["op"] for m in new} == {"update", "delete"}


def start_sync(service_env: ServiceRun, url: str, **extra: str) -> subprocess.Popen[bytes]:
    service_env.env.update({"GITLAB_BASE_URL": f"{url}/api/v4",
                            "GITLAB_PRIVATE_TOKEN": "sim-token", "SYNC_OBJECTS": "true",
                            "BACKFILL_WAITER_INTERVAL": "0.1", "SCHEDULING_POLL_INTERVAL": "1",
                            **extra})
    return service_env.start("run")


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


def test_a_sweep_brings_every_change_deletion_and_label_only_edit(
        service_env: ServiceRun) -> None:
    with running_simulator(SPEC) as sim:
        proc = start_sync(service_env, sim.url, OBJECT_SWEEP_INTERVAL="0")
        log = service_env.logs[-1]
        out = service_env.cwd / "events.jsonl"
        try:
            wait_for(lambda: len(object_rounds(log)) >= 1, 120, "the first object round")
            assert_matches(from_file(out), ground_truth(sim.url))  # the backfill
            before = versions(messages(out))
            done = apply_changes(sim.url)
            seen = len(object_rounds(log))
            wait_for(lambda: len(object_rounds(log)) >= seen + 2, 60, "a whole object round")
            rounds = object_rounds(log)
            assert all(r["ok"] and r["sweep"] for r in rounds), rounds
            check_after_changes(messages(out), sim.url, done, before)
        finally:
            stop(proc)


def test_events_refresh_at_once_and_an_idle_round_reads_only_the_listing(
        service_env: ServiceRun) -> None:
    """With the sweep a day away: changes that GitLab shows as events (a close, a merge, a
    new note) arrive by the next incremental round; a round with nothing changed asks GitLab
    for the project listing only."""
    with running_simulator(SPEC) as sim:
        proc = start_sync(service_env, sim.url, SYNC_USERS="false")
        log = service_env.logs[-1]
        out = service_env.cwd / "events.jsonl"
        try:
            wait_for(lambda: len(object_rounds(log)) >= 3, 120, "three object rounds")
            idle = object_rounds(log)[-1]
            assert idle["ok"] and not idle["sweep"] and idle["projects"] == 0, idle
            assert idle["requests"] == 1, idle  # one listing page, no project read
            done = {"close": change_somewhere(sim.url, 2, kind="close_issue"),
                    "merge": change_somewhere(sim.url, 3, kind="merge_mr"),
                    "note": change(sim.url, kind="add_note", project_id=1, on="issue")}
            seen = len(object_rounds(log))
            wait_for(lambda: len(object_rounds(log)) >= seen + 2, 60, "a whole object round")
            last = latest(messages(out))
            for name, parent in (("close", "issues"), ("merge", "merge_requests")):
                r = done[name]
                record = last[f"projects/{r['project_id']}/{parent}/{r['object']['iid']}"]
                assert record["headers"]["updated_at"] == r["updated_at"], name
                assert record["value"]["state"] == r["state"]
            note = done["note"]
            key = f"projects/1/issues/{note['object']['iid']}/notes/{note['note_id']}"
            assert key in last and last[key]["headers"]["op"] == "update"
            assert not any(r["sweep"] for r in object_rounds(log)[1:])
        finally:
            stop(proc)



def from_broker(bootstrap: str, prefix: str) -> list[dict[str, Any]]:
    """Every object record on the checked topics, in each topic's order, as the file sink's
    lines (topic, key, headers, value)."""
    found = []
    for kind in ("issues", "merge_requests", "notes", "pipelines", "jobs", "deployments",
                 "releases", "resource_label_events"):
        for m in consume(bootstrap, f"{prefix}.{kind}", 0, timeout_s=30, settle_s=1.0):
            value = m.value()
            found.append({"topic": f"{PREFIX}.{kind}", "key": m.key().decode(),
                          "headers": {k: (v or b"").decode() for k, v in (m.headers() or [])},
                          "value": None if value is None else json.loads(value)})
    return found


def test_on_redis_and_kafka_one_sweep_brings_every_change(
        service_env: ServiceRun, broker: Broker, redis_address: str, redis_prefix: str,
        saq_keys: object) -> None:
    """The same on the engine: SAQ on Redis for the backfill, the Redis store, Kafka."""
    with running_simulator(SPEC) as sim:
        topics = engine_env(service_env, sim.url, broker, redis_address, redis_prefix)
        proc = start_sync(service_env, sim.url, OBJECT_SWEEP_INTERVAL="0")
        log = service_env.logs[-1]
        try:
            wait_for(lambda: len(object_rounds(log)) >= 1, 120, "the first object round")
            before = versions(from_broker(broker.bootstrap, topics))
            done = apply_changes(sim.url)
            seen = len(object_rounds(log))
            wait_for(lambda: len(object_rounds(log)) >= seen + 2, 60, "a whole object round")
            assert all(r["ok"] for r in object_rounds(log))
        finally:
            stop(proc)
        check_after_changes(from_broker(broker.bootstrap, topics), sim.url, done, before)


def test_windows_end_at_the_round_start_on_gitlabs_clock(service_env: ServiceRun,
                                                         tmp_path: Path) -> None:
    """GitLab's clock 15 minutes behind the service's: an edit (no event) in a project made
    active by a close arrives by the next incremental round. A window ending at the host's
    "now" would have moved the watermark 15 minutes past GitLab's, and the edit would fall
    before the next window."""
    args = ("--projects", "3", "--users", "6", "--events", "60", "--history-days", "1",
            "--quiet-minutes", "120", "--seed", "27")
    with simulator_process(tmp_path / "sim.log", *args, clock_shift_s=-900) as sim:
        proc = start_sync(service_env, sim.url, SYNC_USERS="false")
        log = service_env.logs[-1]
        out = service_env.cwd / "events.jsonl"
        try:
            wait_for(lambda: len(object_rounds(log)) >= 2, 120, "the first object rounds")
            # The edit first: GitLab's clock is read to the second, so an edit in the very
            # second before a round's start may lie after that window; in a project with no
            # later activity it then waits for the sweep, as every edit without an event.
            opened = next((int(p), [r[1] for r in d["issues"] if r[3] == "opened"])
                          for p, d in ground_truth(sim.url)["projects"].items()
                          if sum(r[3] == "opened" for r in d["issues"]) >= 2)
            pid, (other, to_close) = opened[0], opened[1][:2]
            edited = change(sim.url, kind="edit_issue", project_id=pid, iid=other)
            time.sleep(2.5)
            change(sim.url, kind="close_issue", project_id=pid, iid=to_close)  # activity
            seen = len(object_rounds(log))
            wait_for(lambda: len(object_rounds(log)) >= seen + 2, 60, "a whole object round")
            assert not any(r["sweep"] for r in object_rounds(log)[1:])
            last = latest(messages(out))
            record = last[f"projects/{pid}/issues/{other}"]
            assert record["headers"]["updated_at"] == edited["updated_at"]
            assert record["value"]["title"].endswith("(edited)")
        finally:
            stop(proc)
