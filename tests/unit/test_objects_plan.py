"""The import's pure parts: stream keys, stage selection and the waiter's decisions."""

from __future__ import annotations

from gitlab_producer.objects.planner import (
    FINISH,
    decide,
    next_retry_stage,
    next_stage,
    retry_stages,
    stages_for,
)
from gitlab_producer.objects.state import JobRecord, ProjectRecord
from gitlab_producer.objects.streams import KINDS, STREAMS, Scope, stream


def test_keys_are_rest_paths_with_each_segment_encoded() -> None:
    scope = Scope(1000)
    assert stream("releases").key_of(scope, {"tag_name": "rel/1.0"}) == \
        "projects/1000/releases/rel%2F1.0"
    assert stream("branches").key_of(scope, {"name": "feature/a b"}) == \
        "projects/1000/repository/branches/feature%2Fa%20b"
    assert stream("issues").key_of(scope, {"iid": 5, "id": 77}) == "projects/1000/issues/5"
    thread = Scope(1000, "merge_requests", 3)
    assert stream("discussions").key_of(thread, {"id": "6a9c"}) == \
        "projects/1000/merge_requests/3/discussions/6a9c"
    assert stream("discussions").url(thread) == "projects/1000/merge_requests/3/discussions"
    assert stream("group").key_of(scope, {"id": 100}) == "groups/100"


def test_every_kind_has_a_stream_and_notes_come_from_discussions() -> None:
    assert {s.kind for s in STREAMS} | {"notes"} == set(KINDS)
    assert stream("discussions").nested_notes


def test_stages_follow_the_kinds_asked_for() -> None:
    every = stages_for(KINDS)
    assert every == [1, 2, 3, 4, 5, 6, 7, 8, 10, FINISH]
    assert stages_for({"issues"}) == [1, 6, FINISH]
    assert stages_for({"notes"}) == [1, 4, 6, FINISH]  # merge request threads need stage 4's iids
    assert next_stage(6, {"issues"}) == FINISH


def test_a_retry_pass_runs_the_failed_stages_and_what_derives_from_them_in_order() -> None:
    # A failed merge request listing (stage 4): the fan-outs of stages 6 (their discussions)
    # and 7 (their events) ran without its iids, and run again after it.
    assert retry_stages({4}, KINDS) == [4, 6, 7, FINISH]
    assert retry_stages({6}, KINDS) == [6, 7, FINISH]
    assert retry_stages({2, 8}, KINDS) == [2, 8, FINISH]
    assert retry_stages({4}, {*KINDS, "attachments"}) == [4, 6, 7, 9, FINISH]
    assert retry_stages({4}, {"merge_requests"}) == [4, FINISH]  # no later stage derives
    assert retry_stages({FINISH}, KINDS) == [FINISH]
    assert next_retry_stage(4, {4}, KINDS) == 6
    assert next_retry_stage(7, {4}, KINDS) == FINISH


def job(job_id: str, status: str, gen: int = 0) -> JobRecord:
    return JobRecord(job_id, 1, 6, "children", status=status, gen=gen)


def test_waiter_waits_and_redispatches_only_jobs_the_engine_lost() -> None:
    project = ProjectRecord(1, stage=6, jobs=["a"])
    jobs = {"a": job("a", "done"), "b": job("b", "queued"), "c": job("c", "queued", gen=2)}
    decision = decide(project, jobs, pending_keys={"c:g2"})
    assert decision.action == "wait"
    assert decision.redispatch == ("b",)


def test_waiter_advances_when_every_job_finished_and_names_the_failed() -> None:
    project = ProjectRecord(1, stage=6, jobs=["a"])
    jobs = {"a": job("a", "done"), "b": job("b", "failed")}
    decision = decide(project, jobs, pending_keys=set())
    assert decision.action == "advance" and decision.failed == ("b",)


def test_waiter_stops_for_a_gone_project() -> None:
    project = ProjectRecord(1, stage=6, status="gone", jobs=["a"])
    assert decide(project, {"a": job("a", "queued")}, set()).action == "stop"
