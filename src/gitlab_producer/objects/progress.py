"""How a running backfill shows its progress: a rich progress bar per stage in a terminal
(projects past each stage, rate, ETA, objects imported and records/s), plain JSON log lines
(``backfill_progress``, every few seconds) when stderr is not a terminal."""

from __future__ import annotations

import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Protocol

from gitlab_producer.logs import get_logger
from gitlab_producer.objects.planner import FINISH, STAGE_NAMES

log = get_logger(__name__)
LOG_EVERY_S = 5.0


@dataclass
class Snapshot:
    """Where the import stands."""

    projects: int
    done: int = 0  # complete or gone
    failed_jobs: int = 0
    at_stage: Counter[int] = field(default_factory=Counter)  # running projects per stage
    imported_here: int = 0  # objects this process imported
    elapsed_s: float = 0.0

    def past(self, stage: int) -> int:
        """Projects that finished ``stage`` (or the whole import)."""
        return self.done + sum(n for s, n in self.at_stage.items() if s > stage)


class ProgressView(Protocol):
    def show(self, snapshot: Snapshot, final: bool = False) -> None:
        """Render the snapshot (``final``: the last one)."""


class LogLines:
    """A JSON log line every ``LOG_EVERY_S`` (and the last one)."""

    def __init__(self) -> None:
        self._last = 0.0

    def show(self, snapshot: Snapshot, final: bool = False) -> None:
        if not final and time.monotonic() - self._last < LOG_EVERY_S:
            return
        self._last = time.monotonic()
        log.info("backfill_progress", projects_done=snapshot.done, projects=snapshot.projects,
                 failed_jobs=snapshot.failed_jobs, imported_here=snapshot.imported_here,
                 records_per_s=round(snapshot.imported_here / max(1e-9, snapshot.elapsed_s), 1),
                 at_stage={STAGE_NAMES.get(s, str(s)): n
                           for s, n in sorted(snapshot.at_stage.items())})


class ProgressBars:
    """One bar per stage (projects past it) and one for the whole import, on stderr."""

    def __init__(self, projects: int, stages: list[int]) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
        )

        self._bars = Progress(TextColumn("{task.description:<18}"), BarColumn(),
                              MofNCompleteColumn(), TextColumn("{task.fields[note]}"),
                              TimeRemainingColumn(), console=Console(stderr=True))
        self._stages = {n: self._bars.add_task(STAGE_NAMES[n], total=projects, note="")
                        for n in stages if n != FINISH}
        self._all = self._bars.add_task("import", total=projects, note="")
        self._bars.start()

    def show(self, snapshot: Snapshot, final: bool = False) -> None:
        for stage, task in self._stages.items():
            self._bars.update(task, completed=snapshot.past(stage))
        rate = snapshot.imported_here / max(1e-9, snapshot.elapsed_s)
        self._bars.update(self._all, completed=snapshot.done,
                          note=f"{snapshot.imported_here} objects, {rate:.0f}/s, "
                               f"{snapshot.failed_jobs} failed jobs")
        if final:
            self._bars.stop()


def open_view(projects: int, stages: list[int], stream: Any = None) -> ProgressView:
    """Bars (one per stage of ``stages``) when ``stream`` (stderr) is a terminal, log lines
    otherwise."""
    if (stream or sys.stderr).isatty():
        return ProgressBars(projects, stages)
    return LogLines()
