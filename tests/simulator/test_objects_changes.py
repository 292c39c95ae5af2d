"""Objects change over time as on a real instance: through the inspection switch and in live
mode, ``updated_at``, resource events, the events API and ``last_activity_at`` move exactly as
GitLab moves them, deleted objects vanish, and the generated base follows the seed."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import httpx
import pytest

from gitlab_producer.simulator.objects_changes import truth
from gitlab_producer.simulator.objects_store import ObjectWorld
from gitlab_producer.simulator.server import SimulatorThread, running_simulator
from gitlab_producer.simulator.world import World, WorldSpec

# The history ends two hours before start-up: every project's last_activity_at is older than
# the hour after which GitLab moves it.
SPEC = WorldSpec(projects=12, users=8, events=600, seed=9, history_days=1.0,
                 quiet_s=7200.0, feature_off_share=0.0)
TOKEN = {"PRIVATE-TOKEN": "sim-token"}


@pytest.fixture
def sim() -> Iterator[SimulatorThread]:
    with running_simulator(SPEC) as running:
        yield running


@pytest.fixture
def api(sim: SimulatorThread) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=f"{sim.url}/api/v4", headers=TOKEN, timeout=10) as client:
        yield client


def change(sim: SimulatorThread, **body: Any) -> dict[str, Any]:
    r = httpx.post(f"{sim.url}/_simulator/changes", json=body, timeout=10)
    assert r.status_code == 200, r.text
    result: dict[str, Any] = r.json()["changes"][0]
    return result


def ms(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def events(api: httpx.Client, pid: int) -> list[dict[str, Any]]:
    answer: list[dict[str, Any]] = api.get(f"/projects/{pid}/events",
                                           params={"per_page": 100}).json()
    return answer


def test_label_change_bumps_updated_at_without_an_event(sim: SimulatorThread,
                                                        api: httpx.Client) -> None:
    before = api.get("/projects/3/issues/1").json()
    activity = api.get("/projects/3").json()["last_activity_at"]
    seen = events(api, 3)
    label = next(n for n in ("bug", "docs", "feature", "needs review") if n not in before["labels"])
    done = change(sim, kind="add_label", project_id=3, iid=1, label=label)
    after = api.get("/projects/3/issues/1").json()
    assert ms(after["updated_at"]) > ms(before["updated_at"])
    assert after["updated_at"] == done["updated_at"] and label in after["labels"]
    label_events = api.get("/projects/3/issues/1/resource_label_events").json()
    assert (label_events[-1]["action"], label_events[-1]["label"]["name"]) == ("add", label)
    assert label_events[-1]["created_at"] == after["updated_at"]
    assert events(api, 3) == seen  # no entry in the events API
    assert api.get("/projects/3").json()["last_activity_at"] == activity
    change(sim, kind="remove_label", project_id=3, iid=1, label=label)
    removed = api.get("/projects/3/issues/1/resource_label_events").json()[-1]
    assert removed["action"] == "remove" and label not in api.get(
        "/projects/3/issues/1").json()["labels"]


def test_note_bumps_noteable_adds_event_and_moves_activity_hourly(sim: SimulatorThread,
                                                                  api: httpx.Client) -> None:
    old_activity = api.get("/projects/4").json()["last_activity_at"]
    assert time.time() - ms(old_activity) > 3600
    done = change(sim, kind="add_note", project_id=4, on="merge_request", iid=1,
                  body="A new note")
    mr = api.get("/projects/4/merge_requests/1").json()
    newest = api.get("/projects/4/merge_requests/1/notes").json()[0]
    assert (newest["id"], newest["body"]) == (done["note_id"], "A new note")
    assert mr["updated_at"] == newest["created_at"] == done["updated_at"]
    event = events(api, 4)[0]
    assert (event["id"], event["action_name"], event["target_id"]) == (
        done["event_id"], "commented on", newest["id"])
    assert (event["note"]["noteable_type"], event["note"]["noteable_iid"],
            event["note"]["body"]) == ("MergeRequest", 1, "A new note")
    activity = api.get("/projects/4").json()["last_activity_at"]
    assert activity == event["created_at"]  # older than an hour: moved
    again = change(sim, kind="add_note", project_id=4, on="issue", iid=1)
    assert events(api, 4)[0]["id"] == again["event_id"]
    assert api.get("/projects/4").json()["last_activity_at"] == activity  # within the hour
    thread = change(sim, kind="add_thread", project_id=4, iid=1)
    discussion = api.get(f"/projects/4/merge_requests/1/discussions/{thread['discussion_id']}"
                         ).json()
    assert discussion["notes"][0]["position"]["new_path"] == "lib/class.rb"
    reply = change(sim, kind="add_note", project_id=4, on="merge_request", iid=1,
                   reply_to=thread["discussion_id"])
    threaded = api.get(f"/projects/4/merge_requests/1/discussions/{thread['discussion_id']}"
                       ).json()
    assert [n["id"] for n in threaded["notes"]] == [thread["note_id"], reply["note_id"]]


def test_state_changes_add_state_events_and_events(sim: SimulatorThread,
                                                   api: httpx.Client) -> None:
    opened = api.get("/projects/5/issues", params={"state": "opened"}).json()[0]
    closed = change(sim, kind="close_issue", project_id=5, iid=opened["iid"])
    issue = api.get(f"/projects/5/issues/{opened['iid']}").json()
    assert (issue["state"], issue["closed_at"], issue["updated_at"]) == (
        "closed", closed["updated_at"], closed["updated_at"])
    states = api.get(f"/projects/5/issues/{opened['iid']}/resource_state_events").json()
    assert (states[-1]["state"], states[-1]["created_at"]) == ("closed", issue["closed_at"])
    event = events(api, 5)[0]
    assert (event["action_name"], event["target_type"], event["target_iid"]) == (
        "closed", "Issue", opened["iid"])
    assert api.get("/projects/5").json()["last_activity_at"] == event["created_at"]
    change(sim, kind="reopen_issue", project_id=5, iid=opened["iid"])
    assert api.get(f"/projects/5/issues/{opened['iid']}").json()["state"] == "opened"
    assert api.get(f"/projects/5/issues/{opened['iid']}/resource_state_events"
                   ).json()[-1]["state"] == "reopened"
    assert events(api, 5)[0]["action_name"] == "reopened"
    mr = api.get("/projects/6/merge_requests", params={"state": "opened"}).json()[0]
    merged = change(sim, kind="merge_mr", project_id=6, iid=mr["iid"])
    served = api.get(f"/projects/6/merge_requests/{mr['iid']}").json()
    assert (served["state"], served["merged_at"]) == ("merged", merged["updated_at"])
    assert events(api, 6)[0]["action_name"] == "accepted"


def test_updated_after_finds_exactly_the_changed_issues(sim: SimulatorThread,
                                                        api: httpx.Client) -> None:
    rows = httpx.get(f"{sim.url}/_simulator/objects", params={"project_id": 7}).json()[
        "projects"]["7"]["issues"]
    latest = max(ms(row[2]) for row in rows)  # the generated base ends at start-up
    mark = datetime.fromtimestamp(latest + 0.001).astimezone().isoformat()
    changed = {change(sim, kind="edit_issue", project_id=7, iid=iid)["object"]["id"]
               for iid in (1, 2)}
    found = api.get("/projects/7/issues", params={"updated_after": mark}).json()
    assert {i["id"] for i in found} == changed
    assert all(i["title"].endswith("(edited)") for i in found)


def test_pipelines_run_then_finish_and_pushes_are_events(sim: SimulatorThread,
                                                         api: httpx.Client) -> None:
    pushed = change(sim, kind="push", project_id=8)
    event = events(api, 8)[0]
    assert (event["id"], event["action_name"]) == (pushed["event_id"], "pushed to")
    assert event["push_data"]["commit_to"] == pushed["commit"]
    head = api.get("/projects/8/repository/commits", params={"per_page": 1}).json()[0]
    assert head["id"] == pushed["commit"]
    pipe = api.get(f"/projects/8/pipelines/{pushed['object']['id']}").json()
    assert (pipe["status"], pipe["sha"]) == ("running", pushed["commit"])
    running = api.get("/projects/8/pipelines", params={"status": "running"}).json()
    assert pipe["id"] in {p["id"] for p in running}
    seen = events(api, 8)
    change(sim, kind="finish_pipelines", project_id=8)
    finished = api.get(f"/projects/8/pipelines/{pipe['id']}").json()
    assert finished["status"] == "success" and ms(finished["updated_at"]) > ms(pipe["updated_at"])
    jobs = api.get(f"/projects/8/pipelines/{pipe['id']}/jobs").json()
    assert {j["status"] for j in jobs} == {"success"}
    assert events(api, 8) == seen  # pipelines are not events


def test_deleted_objects_vanish_and_answer_404(sim: SimulatorThread, api: httpx.Client) -> None:
    listed = api.get("/projects/9/issues", params={"per_page": 100}).json()
    gone = change(sim, kind="delete_issue", project_id=9, iid=listed[0]["iid"])
    assert api.get(f"/projects/9/issues/{listed[0]['iid']}").status_code == 404
    assert api.get(f"/projects/9/issues/{listed[0]['iid']}/notes").status_code == 404
    left = api.get("/projects/9/issues", params={"per_page": 100}).json()
    assert [i["id"] for i in left] == [i["id"] for i in listed[1:]]
    facts = httpx.get(f"{sim.url}/_simulator/objects", params={"project_id": 9}).json()
    assert gone["object"]["id"] in facts["projects"]["9"]["deleted"]["issues"]
    assert gone["object"]["id"] not in {r[0] for r in facts["projects"]["9"]["issues"]}
    note = api.get("/projects/9/merge_requests/1/notes").json()[0]
    change(sim, kind="delete_note", project_id=9, note_id=note["id"])
    assert api.get(f"/projects/9/merge_requests/1/notes/{note['id']}").status_code == 404
    change(sim, kind="delete_project", project_id=10)
    for path in ("/projects/10", "/projects/10/issues", "/projects/10/events"):
        assert api.get(path).status_code == 404
    assert 10 not in {p["id"] for p in api.get("/projects", params={"per_page": 100}).json()}


def test_unknown_changes_are_refused(sim: SimulatorThread) -> None:
    for body in ({"kind": "nope"}, {"kind": "close_issue", "project_id": 2, "iid": 99999}):
        r = httpx.post(f"{sim.url}/_simulator/changes", json=body)
        assert r.status_code == 400 and r.json()["error"]


def snapshot(sim: SimulatorThread) -> set[tuple[str, str, tuple[Any, ...]]]:
    projects = httpx.get(f"{sim.url}/_simulator/objects", timeout=10).json()["projects"]
    return {(pid, kind, tuple(row)) for pid, facts in projects.items()
            for kind in ("issues", "merge_requests", "pipelines") for row in facts[kind]}


def test_live_mode_changes_objects(sim: SimulatorThread) -> None:
    before = snapshot(sim)
    r = httpx.post(f"{sim.url}/_simulator/settings", json={"change_rate": 100})
    assert r.json()["change_rate"] == 100
    deadline = time.monotonic() + 10
    while snapshot(sim) == before:
        assert time.monotonic() < deadline, "no object changed in live mode"
        time.sleep(0.05)
    httpx.post(f"{sim.url}/_simulator/settings", json={"change_rate": 0})


def test_generated_objects_follow_the_seed() -> None:
    def facts(seed: int) -> dict[str, Any]:
        world = World(WorldSpec(projects=6, users=5, events=300, seed=seed),
                      now_ms=1_700_000_000_000)
        return truth(ObjectWorld(world, cache_projects=2), list(range(1, 7)))

    first = facts(4)
    assert first == facts(4)
    assert first != facts(5)


def test_evicted_projects_come_back_the_same() -> None:
    world = World(WorldSpec(projects=6, users=5, events=300, seed=2), now_ms=1_700_000_000_000)
    objects = ObjectWorld(world, cache_projects=1)
    once = truth(objects, [1])
    truth(objects, [2, 3])  # pushes project 1 out of the cache
    assert truth(objects, [1]) == once
    assert objects.generated == 4


def test_lists_read_before_a_change_show_it_after(sim: SimulatorThread,
                                                  api: httpx.Client) -> None:
    def listed() -> dict[int, dict[str, Any]]:
        return {i["iid"]: i for i in api.get("/projects/11/issues",
                                             params={"per_page": 100}).json()}

    before = listed()[1]
    change(sim, kind="add_note", project_id=11, on="issue", iid=1)
    after = listed()[1]
    assert after["user_notes_count"] == before["user_notes_count"] + 1
    assert ms(after["updated_at"]) > ms(before["updated_at"])
    label = change(sim, kind="add_label", project_id=11, iid=1)["label"]  # not an event
    assert label in listed()[1]["labels"]
    jobs = api.get("/projects/11/jobs").json()
    change(sim, kind="run_pipeline", project_id=11)
    assert len(api.get("/projects/11/jobs", params={"per_page": 100}).json()) > len(jobs)


def test_milestones_filter_by_updated_after_and_before(api: httpx.Client) -> None:
    """GitLab's documented milestone filters, bounds included."""
    pid, every = next((p, found) for p in range(1, SPEC.projects + 1)
                      if len(found := api.get(f"/projects/{p}/milestones",
                                              params={"per_page": 100}).json()) >= 2)
    times = sorted(m["updated_at"] for m in every)
    middle = times[len(times) // 2]
    after = api.get(f"/projects/{pid}/milestones", params={"updated_after": middle}).json()
    before = api.get(f"/projects/{pid}/milestones", params={"updated_before": middle}).json()
    assert {m["id"] for m in after} == {m["id"] for m in every if m["updated_at"] >= middle}
    assert {m["id"] for m in before} == {m["id"] for m in every if m["updated_at"] <= middle}
