"""The ``rounds`` readiness check: ready while the sync makes progress, not only after a
recent successful round."""

from __future__ import annotations

from gitlab_producer.http.ops import RoundWatch


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_a_long_round_that_moves_is_ready_and_one_that_stalls_is_not() -> None:
    clock = Clock()
    progress: list[float | None] = [None]
    watch = RoundWatch(30.0, lambda: progress[0], clock)
    assert await watch() is None  # just started
    watch.round_started()
    for _ in range(20):  # a first catch-up of 200 s, a page every 10 s
        clock.now += 10
        progress[0] = clock.now
        assert await watch() is None
    clock.now += 31  # no page for 31 s
    problem = await watch()
    assert problem is not None and "no progress for 31 s" in problem
    progress[0] = clock.now  # moving again
    assert await watch() is None


async def test_without_a_round_in_progress_a_recent_success_is_needed() -> None:
    clock = Clock()
    watch = RoundWatch(30.0, lambda: clock.now, clock)  # pages "answered" all the time
    clock.now += 31
    assert await watch() == "no successful round for 31 s"  # e.g. retrying the store
    watch.round_started()
    assert await watch() is None
    watch.round_ended(ok=False)
    assert await watch() == "no successful round for 31 s"
    watch.round_started()
    watch.round_ended(ok=True)
    clock.now += 30
    assert await watch() is None
    clock.now += 1
    assert await watch() == "no successful round for 31 s"
