"""The demo's backfill part, and the simulator's object ground truth as the message keys a
complete backfill produces (shared with the backfill tests)."""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import orjson

from gitlab_producer.config import Settings

CHECKED = ("issues", "merge_requests", "notes", "pipelines", "jobs", "deployments", "releases")
NOTEABLE = {"Issue": "issues", "MergeRequest": "merge_requests"}
# The simulator's features (a 403 on their lists when switched off) by kind.
FEATURE = {"issues": "issues", "merge_requests": "merge_requests", "pipelines": "builds",
           "jobs": "builds", "deployments": "builds", "releases": "releases"}


def expected_keys(truth: dict[str, Any]) -> dict[str, set[str]]:
    """Per checked kind, every key a complete import of ``/_simulator/objects``'s projects
    produces (nothing of a feature switched off in a project: its lists answer 403)."""
    out: dict[str, set[str]] = {k: set() for k in CHECKED}
    for pid, data in truth["projects"].items():
        off = set(data["features_off"])
        base = f"projects/{pid}"

        def on(kind: str, off: set[str] = off) -> bool:
            return FEATURE[kind] not in off

        for kind in ("issues", "merge_requests"):
            if on(kind):
                out[kind] |= {f"{base}/{kind}/{row[1]}" for row in data[kind]}
        for note_id, noteable, iid, _updated in data["notes"]:
            if on(NOTEABLE[noteable]):
                out["notes"].add(f"{base}/{NOTEABLE[noteable]}/{iid}/notes/{note_id}")
        if on("pipelines"):
            out["pipelines"] |= {f"{base}/pipelines/{row[0]}" for row in data["pipelines"]}
            out["jobs"] |= {f"{base}/jobs/{row[0]}" for row in data["jobs"]}
            out["deployments"] |= {f"{base}/deployments/{row[0]}" for row in data["deployments"]}
        if on("releases"):
            out["releases"] |= {f"{base}/releases/{quote(tag, safe='')}"
                                for tag in data["releases"]}
    return out


def run_backfill_demo(settings: Settings, url: str, projects: list[int], out: Path) -> int:
    """Backfill ``projects`` to ``out`` and compare with the ground truth; prints one line."""
    from gitlab_producer.objects.backfill import Backfill

    update = {"backfill_projects": ",".join(map(str, projects)), "output_file": str(out),
              "operations_per_second": 1000.0, "backfill_waiter_interval": 0.1,
              "state_path": out.with_suffix(".sqlite3")}
    code = asyncio.run(Backfill(settings.model_copy(update=update)).run())
    truth = httpx.get(f"{url}/_simulator/objects",
                      params=[("project_id", str(p)) for p in projects], timeout=60).json()
    found: dict[str, set[str]] = {}
    versions: Counter[tuple[str, str]] = Counter()
    kinds: Counter[str] = Counter()
    with out.open("rb") as lines:
        for line in lines:
            message = orjson.loads(line)
            kind = message["topic"].rsplit(".", 1)[1]
            kinds[kind] += 1
            found.setdefault(kind, set()).add(message["key"])
            headers = message["headers"]
            versions[(message["key"], headers.get("updated_at") or headers["content_hash"])] += 1
    expected = expected_keys(truth)
    missing = sum(len(keys - found.get(kind, set())) for kind, keys in expected.items())
    doubled = sum(n - 1 for n in versions.values())
    print(f"backfill: {sum(kinds.values())} objects of {len(kinds)} kinds from "
          f"{len(projects)} projects to {out}; ground truth ({', '.join(CHECKED)}): "
          f"missing {missing}; doubled {doubled}", flush=True)
    return 0 if code == 0 and missing == 0 and doubled == 0 else 1
