"""The simulator's single-commit endpoints as python-gitlab and raw HTTP see them."""

from __future__ import annotations

from collections.abc import Iterator

import gitlab
import httpx
import pytest

from gitlab_producer.simulator.repository import BRANCHES, branch_commits
from gitlab_producer.simulator.server import SimulatorThread, running_simulator
from gitlab_producer.simulator.world import WorldSpec

SPEC = WorldSpec(projects=12, users=20, events=100, seed=5)
TOKEN = {"PRIVATE-TOKEN": "sim-token"}


@pytest.fixture(scope="module")
def sim() -> Iterator[SimulatorThread]:
    with running_simulator(SPEC) as running:
        yield running


def test_python_gitlab_gets_a_commit_and_its_branches(sim: SimulatorThread) -> None:
    gl = gitlab.Gitlab(sim.url, private_token="sim-token")
    project = gl.projects.get(4, lazy=True)
    main, feature = (branch_commits(4, b) for b in BRANCHES)
    shared, own = main[0], feature[-1]
    commit = project.commits.get(shared)
    assert commit.id == shared and commit.parent_ids == []
    assert sorted(r["name"] for r in commit.refs("branch")) == sorted(BRANCHES)
    later = project.commits.get(own)
    assert later.parent_ids == [feature[-2]]
    assert [r["name"] for r in later.refs("branch")] == [BRANCHES[1]]
    assert project.commits.get("main").id == main[-1]  # a branch name names its head


def test_unknown_commits_and_projects_get_404(sim: SimulatorThread) -> None:
    with httpx.Client(base_url=f"{sim.url}/api/v4", headers=TOKEN, timeout=10) as api:
        other = branch_commits(5, BRANCHES[0])[3]  # a commit of another project
        for sha in ("0" * 40, other, "not-a-ref"):
            answer = api.get(f"/projects/4/repository/commits/{sha}")
            assert answer.status_code == 404
            assert answer.json() == {"message": "404 Commit Not Found"}
        assert api.get(f"/projects/999/repository/commits/{other}").status_code == 404
        by_path = api.get(f"/projects/group1%2Fproject-5/repository/commits/{other}")
        assert by_path.status_code == 200 and by_path.json()["project_id"] == 5
