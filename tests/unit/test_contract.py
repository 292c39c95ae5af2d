"""docs/messages.md's JSON Schema accepts every kind of event the simulator serves."""

from __future__ import annotations

import re
from pathlib import Path

import jsonschema
import orjson

from gitlab_producer.simulator.world import World, WorldSpec

DOC = Path(__file__).parents[2] / "docs" / "messages.md"


def test_documented_schema_matches_served_events() -> None:
    block = re.search(r"```json\n(.*?)```", DOC.read_text(), re.S)
    assert block is not None
    schema = orjson.loads(block.group(1))
    jsonschema.Draft202012Validator.check_schema(schema)
    world = World(WorldSpec(projects=20, users=5, events=400, seed=5))
    events = [orjson.loads(world.render(i)) for i in range(400)]
    kinds = {(e["action_name"], e["target_type"], e["project_id"] is None) for e in events}
    assert len(kinds) >= 8
    validator = jsonschema.Draft202012Validator(schema)
    for event in events:
        validator.validate(event)
    broken = dict(events[0], id="seven")
    assert not validator.is_valid(broken)
