"""The simulator's project objects (issues, merge requests, notes, CI, repository data, groups,
uploads) as GitLab's REST documentation describes them: through python-gitlab for lists,
single and lazy objects, through raw HTTP for headers, filters, 403/404 and 429 shapes."""

from __future__ import annotations

import re
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import gitlab
import httpx
import pytest

from gitlab_producer.gitlab.pagination import parse_link
from gitlab_producer.simulator.control import BARE_429_ROUTES, RouteBudget
from gitlab_producer.simulator.objects import BIG_MR_NOTES
from gitlab_producer.simulator.repository import COMMITS_PER_BRANCH, FORK_AT
from gitlab_producer.simulator.server import SimulatorThread, running_simulator
from gitlab_producer.simulator.world import WorldSpec

SPEC = WorldSpec(projects=40, users=15, events=3000, seed=5, history_days=2.0,
                 hidden_share=0.0, feature_off_share=0.25)
TOKEN = {"PRIVATE-TOKEN": "sim-token"}
ADMIN = {"PRIVATE-TOKEN": "sim-admin-token"}


@pytest.fixture(scope="module")
def sim() -> Iterator[SimulatorThread]:
    with running_simulator(SPEC) as running:
        yield running


@pytest.fixture
def api(sim: SimulatorThread) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=f"{sim.url}/api/v4", headers=TOKEN, timeout=10) as client:
        yield client


@pytest.fixture
def gl(sim: SimulatorThread) -> gitlab.Gitlab:
    return gitlab.Gitlab(sim.url, private_token="sim-token")


def truth(sim: SimulatorThread, *pids: int) -> dict[str, Any]:
    answer = httpx.get(f"{sim.url}/_simulator/objects", params=[("project_id", p) for p in pids],
                       timeout=30).json()
    projects: dict[str, Any] = answer["projects"]
    return projects


def ms(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


# -- python-gitlab: lists, single objects, lazy objects ---------------------------------------
def test_python_gitlab_pages_issues_and_merge_requests(gl: gitlab.Gitlab,
                                                      sim: SimulatorThread) -> None:
    facts = truth(sim, 1)["1"]
    project = gl.projects.get(1, lazy=True)
    paged = list(project.issues.list(iterator=True, per_page=7, order_by="updated_at",
                                     sort="asc"))
    expected = sorted(facts["issues"], key=lambda row: (ms(row[2]), row[0]))
    assert [i.id for i in paged] == [row[0] for row in expected]
    assert len(paged) > 7
    every = project.mergerequests.list(get_all=True, per_page=5)
    assert sorted(m.iid for m in every) == sorted(row[1] for row in facts["merge_requests"])
    assert {m.state for m in every} <= {"opened", "closed", "merged"}


def test_python_gitlab_single_and_lazy_objects(gl: gitlab.Gitlab, sim: SimulatorThread) -> None:
    facts = truth(sim, 1)["1"]
    project = gl.projects.get(1)
    assert project.issues_enabled and project.merge_requests_enabled
    assert project.open_issues_count == sum(row[3] == "opened" for row in facts["issues"])
    assert project.namespace["full_path"] in project.path_with_namespace
    issue_iid = facts["issues"][0][1]
    issue = project.issues.get(issue_iid)
    assert (issue.id, issue.iid, issue.project_id) == (facts["issues"][0][0], issue_iid, 1)
    notes = gl.projects.get(1, lazy=True).issues.get(issue_iid, lazy=True).notes.list(
        get_all=True)
    assert sorted(n.id for n in notes) == sorted(
        row[0] for row in facts["notes"] if row[1] == "Issue" and row[2] == issue_iid)
    mr = gl.projects.get(1, lazy=True).mergerequests.get(1, lazy=True)
    mr_notes = list(mr.notes.list(iterator=True, per_page=100))
    assert len(mr_notes) >= BIG_MR_NOTES > 100
    assert all(n.noteable_iid == 1 and n.noteable_type == "MergeRequest" for n in mr_notes)
    single = mr.notes.get(mr_notes[0].id)
    assert single.body == mr_notes[0].body
    threads = mr.discussions.list(get_all=True)
    assert sorted(n["id"] for d in threads for n in d.attributes["notes"]) == sorted(
        n.id for n in mr_notes)
    assert any(n.get("position") for d in threads for n in d.attributes["notes"])
    assert mr.discussions.get(threads[0].id).id == threads[0].id


def test_python_gitlab_resource_events_awards_commits_approvals(gl: gitlab.Gitlab) -> None:
    project = gl.projects.get(1, lazy=True)
    merged = project.mergerequests.list(state="merged", get_all=True)
    assert merged
    mr = project.mergerequests.get(merged[0].iid, lazy=True)
    states = mr.resourcestateevents.list(get_all=True)
    assert [s.state for s in states][-1] == "merged"
    assert states[-1].resource_type == "MergeRequest" and states[-1].resource_id == merged[0].id
    assert mr.resourcestateevents.get(states[-1].id).state == "merged"
    commits = mr.commits()
    assert [c.id for c in commits] and all(len(c.id) == 40 for c in commits)
    approvals = mr.approvals.get()
    assert approvals.approved and approvals.approved_by
    labelled = next(i for i in project.issues.list(get_all=True) if i.labels)
    label_events = project.issues.get(labelled.iid, lazy=True).resourcelabelevents.list(
        get_all=True)
    assert {e.label["name"] for e in label_events if e.action == "add"} >= set(labelled.labels)
    with_milestone = next(i for i in project.issues.list(get_all=True) if i.milestone)
    milestone_events = project.issues.get(with_milestone.iid, lazy=True
                                          ).resourcemilestoneevents.list(get_all=True)
    assert milestone_events[0].milestone["iid"] == with_milestone.milestone["iid"]
    awarded = next(i for i in project.issues.list(get_all=True) if i.upvotes or i.downvotes)
    emoji = project.issues.get(awarded.iid, lazy=True).awardemojis.list(get_all=True)
    assert sum(e.name == "thumbsup" for e in emoji) == awarded.upvotes


def test_python_gitlab_ci_objects(gl: gitlab.Gitlab, sim: SimulatorThread) -> None:
    facts = truth(sim, 1)["1"]
    project = gl.projects.get(1, lazy=True)
    pipelines = project.pipelines.list(get_all=True, per_page=4)
    assert sorted(p.id for p in pipelines) == sorted(row[0] for row in facts["pipelines"])
    one = project.pipelines.get(pipelines[0].id)
    jobs = one.jobs.list(get_all=True)
    assert jobs and all(j.pipeline["id"] == one.id for j in jobs)
    every_job = list(project.jobs.list(iterator=True, pagination="keyset", order_by="id",
                                       sort="desc", per_page=5))
    assert [j.id for j in every_job] == sorted((row[0] for row in facts["jobs"]), reverse=True)
    assert project.jobs.get(every_job[0].id).id == every_job[0].id
    deployments = project.deployments.list(get_all=True, order_by="updated_at",
                                           updated_after="2000-01-01T00:00:00Z")
    assert sorted(d.id for d in deployments) == sorted(row[0] for row in facts["deployments"])
    assert all(d.deployable["stage"] == "deploy" for d in deployments)


def test_python_gitlab_repository_and_project_lists(gl: gitlab.Gitlab) -> None:
    project = gl.projects.get(1, lazy=True)
    names = {b.name for b in project.branches.list(get_all=True)}
    assert names == {"main", "feature/login-page"}
    assert project.branches.get("feature/login-page").commit["id"]
    assert [p.name for p in project.protectedbranches.list(get_all=True)] == ["main"]
    assert len(project.labels.list(get_all=True)) == 6
    milestones = project.milestones.list(get_all=True)
    assert project.milestones.get(milestones[0].id).iid == milestones[0].iid
    main = project.commits.list(get_all=True, ref_name="main")
    everything = project.commits.list(get_all=True, all=True, with_stats=True)
    feature_only = COMMITS_PER_BRANCH - FORK_AT  # the feature branch forks from main
    assert len(everything) == len(main) + feature_only
    assert all("stats" in c.attributes for c in everything)
    assert main[0].parent_ids == [main[1].id]  # newest first, a linear history
    members = project.members_all.list(get_all=True)
    assert members and all(m.access_level in (10, 20, 30, 40, 50) for m in members)
    releases = project.releases.list(get_all=True)
    tags = project.tags.list(get_all=True)
    assert {r.tag_name for r in releases} == {t.name for t in tags}
    targets = {t.name: t.target for t in tags}
    assert releases and all(project.releases.get(r.tag_name).commit["id"] == targets[r.tag_name]
                            for r in releases)
    assert project.tags.get(tags[0].name).target == tags[0].target
    assert project.commits.get(main[0].id).parent_ids == main[0].parent_ids
    assert project.labels.get("bug").color.startswith("#")


def test_python_gitlab_groups_walk_to_the_top(gl: gitlab.Gitlab) -> None:
    project = gl.projects.get(10)
    group = gl.groups.get(project.namespace["id"])
    chain = [group.full_path]
    while group.parent_id is not None:
        group = gl.groups.get(group.parent_id)
        chain.append(group.full_path)
    assert chain[-1] == project.namespace["full_path"].split("/")[0]
    assert len(chain) == 2 and project.path_with_namespace.startswith(chain[0] + "/")
    listed = gl.groups.get(project.namespace["id"], lazy=True).projects.list(get_all=True)
    assert 10 in {p.id for p in listed}


def test_groups_by_path_and_with_subgroups(api: httpx.Client) -> None:
    listed = api.get("/groups", params={"per_page": 100})
    assert listed.headers["x-total"] == "50"
    assert api.get("/groups/group1%2Fgroup11").json()["id"] == 11
    assert api.get("/groups/group2%2Fgroup11").status_code == 404  # not its parent
    own = {p["id"] for p in api.get("/groups/1/projects", params={"per_page": 100}).json()}
    deep = {p["id"] for p in api.get("/groups/1/projects", params={
        "per_page": 100, "include_subgroups": "true"}).json()}
    subgroup = {p["id"] for p in api.get("/groups/11/projects", params={"per_page": 100}).json()}
    assert subgroup and deep == own | subgroup | {
        p["id"] for g in (21, 31, 41)
        for p in api.get(f"/groups/{g}/projects", params={"per_page": 100}).json()}


def test_users_show_email_only_to_administrators(sim: SimulatorThread) -> None:
    admin = gitlab.Gitlab(sim.url, private_token="sim-admin-token").users.get(3)
    plain = gitlab.Gitlab(sim.url, private_token="sim-token").users.get(3)
    assert admin.email == "user3@example.com"
    assert "email" not in plain.attributes


# -- events name real objects ------------------------------------------------------------------
def test_events_name_real_issues_merge_requests_and_notes(api: httpx.Client,
                                                          sim: SimulatorThread) -> None:
    pids = list(range(1, 9))
    facts = truth(sim, *pids)
    checked = 0
    for pid in pids:
        known = facts[str(pid)]
        issues = {row[0]: row[1] for row in known["issues"]}
        mrs = {row[0]: row[1] for row in known["merge_requests"]}
        notes = {row[0]: (row[1], row[2]) for row in known["notes"]}
        events = api.get(f"/projects/{pid}/events", params={"per_page": 100}).json()
        for event in events:
            kind = event["target_type"]
            if kind == "Issue":
                assert issues[event["target_id"]] == event["target_iid"]
            elif kind == "MergeRequest":
                assert mrs[event["target_id"]] == event["target_iid"]
            elif kind == "Note":
                note = event["note"]
                assert notes[event["target_id"]] == (note["noteable_type"], note["noteable_iid"])
                path = "issues" if note["noteable_type"] == "Issue" else "merge_requests"
                served = api.get(f"/projects/{pid}/{path}/{note['noteable_iid']}/notes/"
                                 f"{note['id']}")
                if path in known["features_off"]:  # switched off after the fact
                    assert served.status_code == 403
                    continue
                assert (served.json()["body"], served.json()["created_at"]) == (
                    note["body"], event["created_at"])
            else:
                continue
            checked += 1
    assert checked > 50


# -- raw HTTP: filters, headers, pagination ----------------------------------------------------
def test_issue_filters(api: httpx.Client, sim: SimulatorThread) -> None:
    rows = truth(sim, 1)["1"]["issues"]
    cut = sorted(ms(r[2]) for r in rows)[len(rows) // 2]
    cut_text = datetime.fromtimestamp(cut).astimezone().isoformat()
    got = api.get("/projects/1/issues", params={"updated_after": cut_text, "per_page": 100,
                                                "order_by": "updated_at", "sort": "asc"}).json()
    assert [i["id"] for i in got] == [r[0] for r in sorted(
        (r for r in rows if ms(r[2]) >= cut), key=lambda r: (ms(r[2]), r[0]))]
    closed = api.get("/projects/1/issues", params={"state": "closed", "per_page": 100}).json()
    assert sorted(i["id"] for i in closed) == sorted(r[0] for r in rows if r[3] == "closed")
    picked = api.get("/projects/1/issues", params=[("iids[]", "1"), ("iids[]", "3")]).json()
    assert sorted(i["iid"] for i in picked) == [1, 3]
    first = api.get("/projects/1/issues", params=[("iids[]", "1"), ("iids[]", "3"),
                                                  ("per_page", "1")])
    rest = httpx.get(parse_link(first.headers["link"])["next"], headers=TOKEN).json()
    assert sorted([first.json()[0]["iid"], rest[0]["iid"]]) == [1, 3]  # links keep both
    details = api.get("/projects/1/issues", params={"with_labels_details": "true",
                                                    "per_page": 100}).json()
    assert all(isinstance(label, dict) and "color" in label
               for i in details for label in i["labels"])
    assert api.get("/projects/1/issues", params={"state": "merged"}).status_code == 400
    assert api.get("/projects/1/issues", params={"order_by": "nope"}).status_code == 400
    merged = api.get("/projects/1/merge_requests", params={"state": "merged",
                                                           "scope": "all"}).json()
    assert merged and all(m["merged_at"] for m in merged)


def test_notes_sort_and_order(api: httpx.Client) -> None:
    base = "/projects/1/merge_requests/1/notes"
    desc = api.get(base, params={"per_page": 100}).json()
    assert [n["created_at"] for n in desc] == sorted((n["created_at"] for n in desc),
                                                     reverse=True)
    asc = api.get(base, params={"per_page": 100, "sort": "asc", "order_by": "updated_at"}).json()
    assert [n["updated_at"] for n in asc] == sorted(n["updated_at"] for n in asc)


def test_more_than_100_notes_page_with_links(api: httpx.Client) -> None:
    first = api.get("/projects/1/merge_requests/1/notes", params={"per_page": 100})
    assert len(first.json()) == 100 and first.headers["x-next-page"] == "2"
    assert int(first.headers["x-total"]) >= BIG_MR_NOTES
    second = httpx.get(parse_link(first.headers["link"])["next"], headers=TOKEN)
    assert len(second.json()) == int(first.headers["x-total"]) - 100
    assert second.headers["x-next-page"] == ""


def test_jobs_keyset_has_only_a_next_link(api: httpx.Client) -> None:
    r = api.get("/projects/1/jobs", params={"pagination": "keyset", "per_page": 3,
                                            "order_by": "id", "sort": "desc"})
    assert set(parse_link(r.headers["link"])) == {"next"}
    assert "x-total" not in r.headers and "x-next-page" not in r.headers
    refused = api.get("/projects/1/jobs", params={"pagination": "keyset", "sort": "asc"})
    assert refused.status_code == 405


def test_deployments_filters_as_the_finder_validates_them(api: httpx.Client) -> None:
    by_update = api.get("/projects/1/deployments", params={
        "updated_after": "2000-01-01T00:00:00Z", "order_by": "id", "per_page": 100})
    assert by_update.status_code == 200  # GitLab only logs the unpaired order ...
    rows = by_update.json()
    assert [d["updated_at"] for d in rows] == sorted(d["updated_at"] for d in rows)  # ... and
    # orders by updated_at anyway
    for params in ({"finished_after": "2000-01-01T00:00:00Z", "order_by": "finished_at"},
                   {"finished_after": "2000-01-01T00:00:00Z", "status": "success"},
                   {"updated_after": "2000-01-01T00:00:00Z", "order_by": "finished_at",
                    "finished_after": "2000-01-01T00:00:00Z", "status": "success"}):
        refused = api.get("/projects/1/deployments", params=params)
        assert refused.status_code == 400 and refused.json()["message"].startswith("400 Bad")
    done = api.get("/projects/1/deployments", params={
        "finished_after": "2000-01-01T00:00:00Z", "order_by": "finished_at",
        "status": "success", "per_page": 100}).json()
    assert done and {d["status"] for d in done} == {"success"}


def test_pipelines_filters(api: httpx.Client, sim: SimulatorThread) -> None:
    rows = truth(sim, 1)["1"]["pipelines"]
    newest = max(ms(r[1]) for r in rows)
    after = datetime.fromtimestamp(newest).astimezone().isoformat()
    got = api.get("/projects/1/pipelines", params={"updated_after": after}).json()
    assert [p["id"] for p in got] == [r[0] for r in rows if ms(r[1]) >= newest]
    success = api.get("/projects/1/pipelines", params={"status": "success",
                                                       "per_page": 100}).json()
    assert {p["status"] for p in success} == {"success"}
    ordered = api.get("/projects/1/pipelines", params={"order_by": "updated_at", "sort": "asc",
                                                       "per_page": 100}).json()
    assert [p["updated_at"] for p in ordered] == sorted(p["updated_at"] for p in ordered)


def test_commits_since_until_and_refs(api: httpx.Client) -> None:
    main = api.get("/projects/1/repository/commits", params={"per_page": 100}).json()
    middle = main[len(main) // 2]["committed_date"]
    since = api.get("/projects/1/repository/commits", params={"since": middle,
                                                              "per_page": 100}).json()
    assert since == [c for c in main if c["committed_date"] >= middle]
    until = api.get("/projects/1/repository/commits", params={"until": middle,
                                                              "per_page": 100}).json()
    assert len(since) + len(until) == len(main) + 1
    assert api.get("/projects/1/repository/commits",
                   params={"ref_name": "nope"}).status_code == 404


def test_no_total_past_10000_issues() -> None:
    spec = WorldSpec(projects=2, users=5, events=100, big_project_issues=10_050)
    with running_simulator(spec) as big, httpx.Client(base_url=f"{big.url}/api/v4",
                                                      headers=TOKEN) as client:
        r = client.get("/projects/1/issues", params={"per_page": 100})
        assert "x-total" not in r.headers and "x-total-pages" not in r.headers
        assert "last" not in parse_link(r.headers["link"]) and r.headers["x-next-page"] == "2"
        tail = client.get("/projects/1/issues", params={"per_page": 100, "page": 101})
        assert len(tail.json()) == 50 and tail.headers["x-next-page"] == ""
        closed = client.get("/projects/1/issues", params={"state": "closed"})
        assert int(closed.headers["x-total"]) < 10_000


# -- 403, 404, uploads, 429 --------------------------------------------------------------------
def test_switched_off_features_answer_403(api: httpx.Client, sim: SimulatorThread) -> None:
    facts = truth(sim, *range(1, SPEC.projects + 1))
    paths = {"issues": "issues", "merge_requests": "merge_requests", "builds": "pipelines",
             "releases": "releases", "wiki": "wikis"}
    seen = set()
    for pid, known in facts.items():
        for feature in known["features_off"]:
            r = api.get(f"/projects/{pid}/{paths[feature]}")
            assert (r.status_code, r.json()) == (403, {"message": "403 Forbidden"})
            seen.add(feature)
        project = api.get(f"/projects/{pid}").json()
        assert project["issues_enabled"] == ("issues" not in known["features_off"])
        if "builds" in known["features_off"]:
            assert api.get(f"/projects/{pid}/jobs").status_code == 403
    assert len(seen) >= 3  # a seeded share of projects, several features
    on = next(pid for pid, known in facts.items() if not known["features_off"])
    assert api.get(f"/projects/{on}/issues").status_code == 200


def test_missing_objects_answer_404(api: httpx.Client) -> None:
    for path in ("/projects/1/issues/99999", "/projects/1/merge_requests/99999/notes",
                 "/projects/999/issues", "/projects/1/pipelines/1", "/projects/1/jobs/5",
                 "/projects/1/issues/1/notes/12345", "/groups/999",
                 "/projects/1/uploads/" + "0" * 32 + "/x.png"):
        r = api.get(path)
        assert r.status_code == 404, path
        assert "message" in r.json()


def test_uploads_in_markdown_are_served(api: httpx.Client) -> None:
    bodies = [r["description"] for r in api.get("/projects/1/releases").json()]
    bodies += [i["description"] for i in api.get("/projects/1/issues",
                                                 params={"per_page": 100}).json()]
    links = {m for body in bodies for m in re.findall(r"/uploads/[0-9a-f]{32}/[^)\s]+", body)}
    assert len(links) >= 2
    assert any("%" in link for link in links)  # awkward names arrive encoded
    for link in links:
        served = api.get(f"/projects/1{link}")
        assert served.status_code == 200 and served.content.startswith(
            b"\x89PNG" if link.endswith(".png") else b"upload ")
        wrong = api.get(f"/projects/1{link.rsplit('/', 1)[0]}/other.txt")
        assert wrong.status_code == 404


@pytest.mark.parametrize("route,path", [("projects_list", "/projects"),
                                        ("project", "/projects/1"),
                                        ("groups", "/groups"),
                                        ("user", "/users/2")])
def test_per_endpoint_429s_carry_no_headers(route: str, path: str) -> None:
    assert route in BARE_429_ROUTES
    budgets = {route: RouteBudget(2, 60)}
    with running_simulator(SPEC, route_budgets=budgets) as s, httpx.Client(
            base_url=f"{s.url}/api/v4", headers=TOKEN) as client:
        codes = [client.get(path).status_code for _ in range(2)]
        refused = client.get(path)
        assert codes == [200, 200] and refused.status_code == 429
        assert refused.json() == {"message": {"error": "This endpoint has been requested too "
                                                       "many times. Try again later."}}
        assert not [h for h in refused.headers if h.startswith("ratelimit")
                    or h == "retry-after"]
        assert client.get("/projects/1/issues").status_code == 200  # other routes go on


def test_gitlab_com_limits_preset_names_the_routes_it_limits() -> None:
    from gitlab_producer.simulator import api, objects_api
    from gitlab_producer.simulator.control import GITLAB_COM_BUDGETS

    limits = {route: (b.limit, b.period_s) for route, b in GITLAB_COM_BUDGETS.items()}
    assert limits == {"projects_list": (2000, 600), "project": (400, 60), "groups": (200, 60),
                      "user": (300, 600)}
    served = {path: (objects_api.route(path) or api.route(path) or ("?",))[0]
              for path in ("projects", "projects/1", "groups", "users/2")}
    assert set(served.values()) == set(limits) and set(limits) <= BARE_429_ROUTES
