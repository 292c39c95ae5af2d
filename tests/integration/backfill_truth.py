"""The simulator's object ground truth as the message keys a complete backfill produces, and
the messages found in Kafka or the file sink, for the backfill tests."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import httpx

from gitlab_producer.demo_backfill import CHECKED, expected_keys
from tests.conftest import consume

__all__ = ["CHECKED", "assert_matches", "envelope_validator", "envelopes", "expected_keys",
           "from_file", "from_kafka", "ground_truth"]

def ground_truth(url: str, project_ids: Iterable[int] | None = None) -> dict[str, Any]:
    params = [("project_id", str(p)) for p in project_ids or []]
    result: dict[str, Any] = httpx.get(f"{url}/_simulator/objects", params=params,
                                       timeout=60).json()
    return result


class Found:
    """Messages per kind: keys, and how often each (key, version) was produced."""

    def __init__(self) -> None:
        self.keys: dict[str, set[str]] = {}
        self.versions: Counter[tuple[str, str, str]] = Counter()
        self.headers: list[dict[str, str]] = []

    def add(self, kind: str, key: str, headers: dict[str, str]) -> None:
        self.keys.setdefault(kind, set()).add(key)
        version = headers.get("updated_at") or headers.get("content_hash", "")
        self.versions[(kind, key, version)] += 1
        self.headers.append(headers)

    @property
    def total(self) -> int:
        return sum(self.versions.values())

    def repeats(self) -> list[tuple[str, str, str]]:
        return [v for v, n in self.versions.items() if n > 1]


DOC = Path(__file__).parents[2] / "docs" / "messages.md"


def envelope_validator() -> Any:
    """docs/messages.md's JSON Schema of an object record's envelope (its last JSON block)."""
    import re

    import jsonschema

    schema = json.loads(re.findall(r"```json\n(.*?)```", DOC.read_text(), re.S)[-1])
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def envelopes(path: Path, prefix: str = "data-bus.gitlab") -> list[dict[str, Any]]:
    return [{"kind": m["topic"].removeprefix(prefix + "."), "key": m["key"],
             "headers": m["headers"], "value": m["value"]}
            for m in map(json.loads, path.read_text().splitlines())]


def from_file(path: Path, prefix: str = "data-bus.gitlab") -> Found:
    found = Found()
    if not path.exists():
        return found
    for line in path.read_text().splitlines():
        message = json.loads(line)
        found.add(message["topic"].removeprefix(prefix + "."), message["key"],
                  message["headers"])
    return found


def from_kafka(bootstrap: str, prefix: str, expected: dict[str, int]) -> Found:
    found = Found()
    for kind, count in expected.items():
        for m in consume(bootstrap, f"{prefix}.{kind}", count, settle_s=0.5):
            found.add(kind, m.key().decode(),
                      {k: (v or b"").decode() for k, v in (m.headers() or [])})
    return found


def assert_matches(found: Found, truth: dict[str, Any], only_truth_projects: bool = False
                   ) -> None:
    """Per checked kind, the keys found are exactly the expected ones (with
    ``only_truth_projects``, keys of other projects are not looked at)."""
    expected = expected_keys(truth)
    prefixes = tuple(f"projects/{p}/" for p in truth["projects"])
    for kind, keys in expected.items():
        got = found.keys.get(kind, set())
        if only_truth_projects:
            got = {k for k in got if k.startswith(prefixes)}
        assert got == keys, (kind, sorted(keys - got)[:5], sorted(got - keys)[:5])
