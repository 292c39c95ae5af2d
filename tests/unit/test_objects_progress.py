"""The backfill's progress view: bars in a terminal, JSON lines otherwise."""

from __future__ import annotations

import io
from collections import Counter

from gitlab_producer.objects.progress import LogLines, ProgressBars, Snapshot, open_view


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_bars_in_a_terminal_and_log_lines_elsewhere() -> None:
    assert isinstance(open_view(3, [1, 2, 11], io.StringIO()), LogLines)
    view = open_view(3, [1, 2, 11], Tty())
    assert isinstance(view, ProgressBars)
    view.show(Snapshot(3), final=True)


def test_projects_past_a_stage() -> None:
    snapshot = Snapshot(5, done=1, at_stage=Counter({2: 2, 6: 1, 8: 1}))
    assert snapshot.past(1) == 5  # every project is beyond stage 1
    assert snapshot.past(2) == 3  # the two at stage 2 are not
    assert snapshot.past(6) == 2  # the finished one and the one at stage 8
