"""GitLab's JSON shapes (REST v4, as documented) for the simulated projects' objects. Every
timestamp goes through ``World.render_time`` (the server's zone), the simulator's one format."""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from gitlab_producer.simulator.catalog import (
    author_json,
    group_of,
    group_parent,
    group_path,
    project_json,
    sha_for,
)
from gitlab_producer.simulator.objects import (
    LABELS,
    Commit,
    Deployment,
    Job,
    Note,
    Pipeline,
    ProjectObjects,
    Release,
    ResourceEvent,
    Thing,
    features_off,
)
from gitlab_producer.simulator.repository import BRANCHES
from gitlab_producer.simulator.world import World

TYPE_NAMES = {"issue": "Issue", "merge_request": "MergeRequest"}


def _t(world: World, ms: int | None) -> str | None:
    return None if ms is None else world.render_time(ms)


@lru_cache(maxsize=4096)
def _project_path(pid: int) -> str:
    return f"{group_path(group_of(pid))[0]}/project-{pid}"


def _web(world: World, pid: int, tail: str) -> str:
    return f"https://{world.spec.host}/{_project_path(pid)}/-/{tail}"


def project_full(world: World, po: ProjectObjects) -> dict[str, Any]:
    """``GET /projects/:id``: the full field set, with the project's switched-off features and
    its open issues counted."""
    pid = po.pid
    data = project_json(pid, world.render_time(world.project_created_ms[pid - 1]),
                        world.render_time(world.project_last_activity_ms[pid - 1]),
                            world.spec.host, False)
    off = features_off(world.spec.seed, pid, world.spec.feature_off_share)
    data["open_issues_count"] = sum(not t.deleted and t.state == "opened"
                                    for t in po.issues.values())
    if "issues" in off:
        del data["open_issues_count"]  # shown only where issues are on
    for feature in ("issues", "merge_requests", "builds", "wiki"):
        data[f"{'jobs' if feature == 'builds' else feature}_enabled"] = feature not in off
    for feature in ("issues", "merge_requests", "builds", "releases", "wiki", "repository"):
        data[f"{feature}_access_level"] = "disabled" if feature in off else "enabled"
    data.update({"snippets_enabled": True, "container_registry_enabled": False,
                 "lfs_enabled": True, "shared_runners_enabled": True,
                 "public_jobs": True, "request_access_enabled": True,
                 "only_allow_merge_if_pipeline_succeeds": False,
                 "permissions": {"project_access": {"access_level": 20,
                                                    "notification_level": 3},
                                 "group_access": None}})
    return data


def group_json(world: World, gid: int) -> dict[str, Any]:
    full_path, full_name = group_path(gid)
    host = world.spec.host
    parent = group_parent(gid)
    return {
        "id": gid, "web_url": f"https://{host}/groups/{full_path}", "name": f"Group {gid}",
        "path": f"group{gid}", "description": f"Group {gid}", "visibility": "internal",
        "share_with_group_lock": False, "require_two_factor_authentication": False,
        "two_factor_grace_period": 48, "project_creation_level": "developer",
        "auto_devops_enabled": None, "subgroup_creation_level": "maintainer",
        "emails_disabled": False, "emails_enabled": True, "mentions_disabled": None,
        "lfs_enabled": True, "default_branch": None, "default_branch_protection": 2,
        "avatar_url": None, "request_access_enabled": True, "full_name": full_name,
        "full_path": full_path,
            "created_at": world.render_time(world.start_ms - (500 + gid) * 86_400_000),
        "parent_id": parent, "organization_id": 1, "shared_runners_setting": "enabled",
    }


def label_json(po: ProjectObjects, name: str) -> dict[str, Any]:
    index = next(i for i, (n, _) in enumerate(LABELS) if n == name)
    color = LABELS[index][1]
    return {"id": po.pid * 100 + index + 1, "name": name, "description": None,
            "description_html": "", "text_color": "#FFFFFF", "color": color,
            "subscribed": False, "priority": None, "is_project_label": True}


def label_counts(po: ProjectObjects, name: str) -> dict[str, Any]:
    data = label_json(po, name)
    issues = [t for t in po.issues.values() if not t.deleted and name in t.labels]
    mrs = [t for t in po.merge_requests.values() if not t.deleted and name in t.labels]
    data.update({"open_issues_count": sum(t.state == "opened" for t in issues),
                 "closed_issues_count": sum(t.state == "closed" for t in issues),
                 "open_merge_requests_count": sum(t.state == "opened" for t in mrs)})
    return data


def milestone_json(world: World, po: ProjectObjects, iid: int) -> dict[str, Any] | None:
    found = next((m for m in po.milestones if m[1] == iid), None)
    if found is None:
        return None
    mid, _, title, created = found
    return {"id": mid, "iid": iid, "project_id": po.pid, "title": title,
            "description": f"{title} of project {po.pid}", "state": "active",
            "created_at": world.render_time(created), "updated_at": world.render_time(created),
                "due_date": None,
            "start_date": None, "expired": False, "web_url": _web(world, po.pid,
                                                                   f"milestones/{iid}")}


def _user(world: World, uid: int | None) -> dict[str, Any] | None:
    return None if uid is None else author_json(uid, world.spec.host)


def _references(world: World, po: ProjectObjects, thing: Thing) -> dict[str, str]:
    mark = "#" if thing.kind == "issue" else "!"
    full = _project_path(po.pid)
    return {"short": f"{mark}{thing.iid}", "relative": f"{mark}{thing.iid}",
            "full": f"{full}{mark}{thing.iid}"}


def thing_json(world: World, po: ProjectObjects, thing: Thing, label_details: bool = False,
               single: bool = False) -> dict[str, Any]:
    """An issue or merge request as its list returns it (``single`` adds the single-object
    fields of merge requests)."""
    assignee = _user(world, thing.assignee)
    tail = f"{'issues' if thing.kind == 'issue' else 'merge_requests'}/{thing.iid}"
    data: dict[str, Any] = {
        "id": thing.id, "iid": thing.iid, "project_id": po.pid, "title": thing.title,
        "description": thing.description, "state": thing.state,
        "created_at": world.render_time(thing.created),
            "updated_at": world.render_time(thing.updated),
        "closed_at": _t(world, thing.closed_at), "closed_by": _user(world, thing.closed_by),
        "labels": ([label_json(po, n) for n in thing.labels] if label_details
                   else list(thing.labels)),
        "milestone": (milestone_json(world, po, thing.milestone)
                      if thing.milestone is not None else None),
        "assignees": [assignee] if assignee else [], "assignee": assignee,
        "author": _user(world, thing.author),
        "user_notes_count": len(thing.live_notes()),
        "upvotes": sum(a.name == "thumbsup" for a in thing.awards),
        "downvotes": sum(a.name == "thumbsdown" for a in thing.awards),
        "discussion_locked": None, "web_url": _web(world, po.pid, tail),
        "time_stats": {"time_estimate": 0, "total_time_spent": 0, "human_time_estimate": None,
                       "human_total_time_spent": None},
        "task_completion_status": {"count": 0, "completed_count": 0},
        "references": _references(world, po, thing),
        "imported": False, "imported_from": "none",
    }
    if thing.kind == "issue":
        data.update({"type": "ISSUE", "issue_type": "issue", "confidential": False,
                     "due_date": None, "merge_requests_count": 0, "has_tasks": False,
                     "blocking_issues_count": 0, "moved_to_id": None,
                     "service_desk_reply_to": None, "severity": "UNKNOWN",
                     "_links": {"self": f"{world.base_url}/api/v4/projects/{po.pid}/issues/"
                                        f"{thing.iid}",
                                "notes": f"{world.base_url}/api/v4/projects/{po.pid}/issues/"
                                         f"{thing.iid}/notes",
                                "award_emoji": f"{world.base_url}/api/v4/projects/{po.pid}/"
                                               f"issues/{thing.iid}/award_emoji",
                                "project": f"{world.base_url}/api/v4/projects/{po.pid}",
                                "closed_as_duplicate_of": None}})
        return data
    sha = thing.commits[-1] if thing.commits else None
    merged_by = _user(world, thing.state_events[-1].user) if thing.state == "merged" else None
    data.update({
        "merged_by": merged_by, "merge_user": merged_by, "merged_at": _t(world, thing.merged_at),
        "target_branch": "main", "source_branch": f"feature/mr-{thing.iid}",
        "reviewers": [], "source_project_id": po.pid, "target_project_id": po.pid,
        "draft": False, "work_in_progress": False, "merge_when_pipeline_succeeds": False,
        "merge_status": "can_be_merged", "detailed_merge_status": (
            "not_open" if thing.state != "opened" else "mergeable"),
        "sha": sha, "merge_commit_sha": (sha_for("merge", po.pid, thing.iid)
                                         if thing.state == "merged" else None),
        "squash_commit_sha": None, "should_remove_source_branch": None,
        "force_remove_source_branch": True, "prepared_at": world.render_time(thing.created),
        "reference": f"!{thing.iid}", "squash": False, "squash_on_merge": False,
        "has_conflicts": False, "blocking_discussions_resolved": True,
    })
    if single:
        main = sha_for("branch", po.pid, "main")
        data.update({"changes_count": str(len(thing.commits)), "user": {"can_merge": False},
                     "diff_refs": {"base_sha": main, "head_sha": sha, "start_sha": main},
                     "merge_error": None, "first_contribution": False, "pipeline": None,
                     "head_pipeline": None, "diverged_commits_count": 0, "rebase_in_progress":
                     False, "first_deployed_to_production_at": None, "latest_build_started_at":
                     None, "latest_build_finished_at": None, "subscribed": False})
    return data


def note_json(world: World, po: ProjectObjects, note: Note) -> dict[str, Any]:
    thing = note.thing
    siblings = po.discussions.get(note.discussion, [])
    kind = "DiffNote" if note.position else ("DiscussionNote" if len(siblings) > 1 else None)
    data: dict[str, Any] = {
        "id": note.id, "type": kind, "body": note.body, "attachment": None,
        "author": _user(world, note.author), "created_at": world.render_time(note.created),
        "updated_at": world.render_time(note.updated), "system": False, "noteable_id": thing.id,
        "noteable_type": TYPE_NAMES[thing.kind], "project_id": po.pid,
        "resolvable": kind is not None, "confidential": False, "internal": False,
        "imported": False, "imported_from": "none", "noteable_iid": thing.iid,
        "commands_changes": {},
    }
    if kind is not None:
        data.update({"resolved": False, "resolved_by": None, "resolved_at": None})
    if note.position:
        data["position"] = dict(note.position)
    return data


def discussion_json(world: World, po: ProjectObjects, discussion: str) -> dict[str, Any]:
    notes = [n for n in po.discussions[discussion] if not n.deleted]
    return {"id": discussion, "individual_note": len(po.discussions[discussion]) == 1
            and notes[0].position is None if notes else True,
            "notes": [note_json(world, po, n) for n in notes]}


def resource_event_json(world: World, po: ProjectObjects, thing: Thing, event: ResourceEvent,
                        kind: str) -> dict[str, Any]:
    data: dict[str, Any] = {"id": event.id, "user": _user(world, event.user),
                            "created_at": world.render_time(event.created),
                            "resource_type": TYPE_NAMES[thing.kind], "resource_id": thing.id}
    if kind == "state":
        data["state"] = event.action
    elif kind == "label":
        data.update({"label": label_json(po, event.value), "action": event.action})
    else:
        data.update({"milestone": milestone_json(world, po, event.value),
                     "action": event.action})
    return data


def award_json(world: World, thing: Thing, index: int) -> dict[str, Any]:
    award = thing.awards[index]
    return {"id": award.id, "name": award.name, "user": _user(world, award.user),
            "created_at": world.render_time(award.created),
                "updated_at": world.render_time(award.created),
            "awardable_id": thing.id, "awardable_type": TYPE_NAMES[thing.kind], "url": None}


def commit_json(world: World, po: ProjectObjects, commit: Commit, stats: bool = False
                ) -> dict[str, Any]:
    author = author_json(commit.author, world.spec.host)
    data: dict[str, Any] = {
        "id": commit.id, "short_id": commit.id[:8], "created_at": world.render_time(commit.created),
        "parent_ids": [commit.parent] if commit.parent else [], "title": commit.title,
        "message": f"{commit.title}\n", "author_name": author["name"],
        "author_email": f"{author['username']}@example.com",
        "authored_date": world.render_time(commit.created), "committer_name": author["name"],
        "committer_email": f"{author['username']}@example.com",
        "committed_date": world.render_time(commit.created), "trailers": {},
            "extended_trailers": {},
        "web_url": _web(world, po.pid, f"commit/{commit.id}"),
    }
    if stats:
        n = int(commit.id[:4], 16)
        data["stats"] = {"additions": n % 50, "deletions": n % 7, "total": n % 50 + n % 7}
    return data


def mr_commit_json(world: World, po: ProjectObjects, thing: Thing, sha: str) -> dict[str, Any]:
    k = thing.commits.index(sha)
    return commit_json(world, po, Commit(sha, thing.commits[k - 1] if k else None,
                                         f"Work {k} for !{thing.iid}", thing.author,
                                         thing.created + k * 60_000, f"feature/mr-{thing.iid}"))


def approvals_json(world: World, po: ProjectObjects, thing: Thing) -> dict[str, Any]:
    approved = [{"user": _user(world, uid)} for uid in thing.approved_by]
    return {"id": thing.id, "iid": thing.iid, "project_id": po.pid, "title": thing.title,
            "description": thing.description, "state": thing.state,
            "created_at": world.render_time(thing.created),
                "updated_at": world.render_time(thing.updated),
            "merge_status": "can_be_merged", "approved": bool(approved),
            "approvals_required": 0, "approvals_left": 0,
            "require_password_to_approve": False, "approved_by": approved,
            "suggested_approvers": [], "approvers": [], "approver_groups": [],
            "user_has_approved": False, "user_can_approve": True,
            "approval_rules_left": [], "has_approval_rules": False,
            "merge_request_approvers_available": False,
            "multiple_approval_rules_available": False, "invalid_approvers_rules": []}


def pipeline_json(world: World, po: ProjectObjects, pipe: Pipeline, single: bool = False
                  ) -> dict[str, Any]:
    data: dict[str, Any] = {
        "id": pipe.id, "iid": pipe.iid, "project_id": po.pid, "sha": pipe.sha, "ref": pipe.ref,
        "status": pipe.status, "source": "push", "created_at": world.render_time(pipe.created),
        "updated_at": world.render_time(pipe.updated), "web_url": _web(world, po.pid,
                                                            f"pipelines/{pipe.id}"),
        "name": None,
    }
    if single:
        duration = None if pipe.finished is None else (pipe.finished - pipe.created) // 1000
        data.update({"before_sha": "0" * 40, "tag": False, "yaml_errors": None,
                     "user": _user(world, pipe.user), "started_at": _t(world, pipe.started),
                     "finished_at": _t(world, pipe.finished), "committed_at": None,
                     "duration": duration, "queued_duration": 1.0, "coverage": None,
                     "detailed_status": {"icon": f"status_{pipe.status}", "text": pipe.status,
                                         "label": pipe.status, "group": pipe.status}})
    return data


def job_json(world: World, po: ProjectObjects, pipe: Pipeline, job: Job) -> dict[str, Any]:
    commit = next((c for c in po.commits if c.id == pipe.sha), None)
    data: dict[str, Any] = {
        "id": job.id, "status": job.status, "stage": job.stage, "name": job.name,
        "ref": pipe.ref, "tag": False, "coverage": None, "allow_failure": False,
        "created_at": world.render_time(job.created), "started_at": _t(world, job.started),
        "finished_at": _t(world, job.finished), "erased_at": None,
        "duration": (None if job.finished is None or job.started is None
                     else (job.finished - job.started) / 1000),
        "queued_duration": 0.5, "user": _user(world, pipe.user),
        "commit": commit_json(world, po, commit) if commit else {"id": pipe.sha},
        "pipeline": pipeline_json(world, po, pipe), "web_url": _web(world, po.pid,
                                                                    f"jobs/{job.id}"),
        "project": {"ci_job_token_scope_enabled": False}, "artifacts": [],
        "runner": None, "artifacts_expire_at": None, "archived": False, "tag_list": [],
    }
    if job.status == "failed":
        data["failure_reason"] = "script_failure"
    return data


def deployment_json(world: World, po: ProjectObjects, dep: Deployment) -> dict[str, Any]:
    return {"id": dep.id, "iid": dep.iid, "ref": dep.pipeline.ref, "sha": dep.pipeline.sha,
            "created_at": world.render_time(dep.created),
                "updated_at": world.render_time(dep.updated),
            "finished_at": _t(world, dep.job.finished) if dep.status == "success" else None,
            "status": dep.status, "user": _user(world, dep.pipeline.user),
            "environment": {"id": po.pid * 10 + 1, "name": "production", "slug": "production",
                            "external_url": f"https://project-{po.pid}.example.com",
                            "created_at": world.render_time(po.created),
                                "updated_at": world.render_time(po.created)},
            "deployable": job_json(world, po, dep.pipeline, dep.job)}


def release_json(world: World, po: ProjectObjects, release: Release) -> dict[str, Any]:
    commit = next(c for c in po.commits if c.id == release.commit)
    return {"tag_name": release.tag, "description": release.description,
            "name": release.name, "created_at": world.render_time(release.created),
            "released_at": world.render_time(release.created), "upcoming_release": False,
            "author": _user(world, release.author), "commit": commit_json(world, po, commit),
            "milestones": [], "commit_path": f"/-/commit/{release.commit}",
            "tag_path": f"/-/tags/{release.tag}",
            "assets": {"count": 0, "sources": [], "links": []}, "evidences": [],
            "_links": {"self": _web(world, po.pid, f"releases/{release.tag}")}}


def branch_json(world: World, po: ProjectObjects, name: str) -> dict[str, Any]:
    commit = latest_commit(po, name)
    return {"name": name, "merged": False, "protected": name == "main",
            "developers_can_push": False, "developers_can_merge": False, "can_push": False,
            "default": name == "main", "web_url": _web(world, po.pid, f"tree/{name}"),
            "commit": commit_json(world, po, commit)}


def latest_commit(po: ProjectObjects, branch: str) -> Commit:
    on = [c for c in po.commits if c.branch == branch]
    if branch != "main":
        base = next((c for c in po.commits if c.id == on[0].parent), None) if on else None
        on = on if base is None else [*history(po, "main", base.id), *on]
    return on[-1]


def history(po: ProjectObjects, branch: str, upto: str | None = None) -> list[Commit]:
    """Commits reachable from ``branch`` (oldest first), up to ``upto`` when given."""
    by_id = {c.id: c for c in po.commits}
    head = upto or latest_commit(po, branch).id
    chain = []
    current: str | None = head
    while current is not None and current in by_id:
        chain.append(by_id[current])
        current = by_id[current].parent
    return chain[::-1]


def tag_json(world: World, po: ProjectObjects, release: Release) -> dict[str, Any]:
    commit = next(c for c in po.commits if c.id == release.commit)
    return {"name": release.tag, "message": f"Version {release.tag}", "target": release.commit,
            "commit": commit_json(world, po, commit),
            "release": {"tag_name": release.tag, "description": release.description},
            "protected": False, "created_at": world.render_time(release.created)}


def protected_branch_json(po: ProjectObjects) -> dict[str, Any]:
    def level(n: int, access: int, text: str) -> dict[str, Any]:
        return {"id": po.pid * 10 + n, "access_level": access,
                "access_level_description": text, "deploy_key_id": None, "user_id": None,
                "group_id": None}
    return {"id": po.pid, "name": BRANCHES[0],
            "push_access_levels": [level(1, 40, "Maintainers")],
            "merge_access_levels": [level(2, 40, "Maintainers")],
            "unprotect_access_levels": [], "allow_force_push": False,
            "code_owner_approval_required": False}
