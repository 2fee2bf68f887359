"""Rich progress bars that respect ``--quiet`` and non-terminal output."""

from __future__ import annotations

import contextlib
import os

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    SpinnerColumn,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.text import Text

# Progress and logs go to stderr so that `--json` output on stdout stays machine-readable.
stderr_console = Console(stderr=True)

_quiet = os.environ.get("FACEPRIV_QUIET", "") not in ("", "0")


def set_quiet(value: bool) -> None:
    global _quiet
    _quiet = bool(value)


def is_quiet() -> bool:
    return _quiet


class RateColumn(ProgressColumn):
    """Items per second (or seconds per item when slow)."""

    def render(self, task) -> Text:
        speed = task.finished_speed or task.speed
        if not speed:
            return Text("-- it/s", style="progress.data.speed")
        if speed < 1:
            return Text(f"{1 / speed:.1f} s/it", style="progress.data.speed")
        return Text(f"{speed:.1f} it/s", style="progress.data.speed")


class _NullProgress(contextlib.AbstractContextManager):
    def __exit__(self, *exc):
        return False

    def add_task(self, *a, **k):
        return 0

    def advance(self, *a, **k):
        pass

    def update(self, *a, **k):
        pass

    @property
    def console(self):
        return stderr_console


def make_progress(*, enabled: bool = True, transient: bool = False, bytes_: bool = False):
    """A rich Progress (or a no-op stand-in when quiet) showing rate and ETA."""
    if not enabled or _quiet:
        return _NullProgress()
    cols: list = [SpinnerColumn(), TextColumn("[bold]{task.description}"), BarColumn()]
    if bytes_:
        cols += [DownloadColumn(), TransferSpeedColumn()]
    else:
        cols += [MofNCompleteColumn(), TaskProgressColumn(), RateColumn()]
    cols += [TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn()]
    return Progress(*cols, console=stderr_console, transient=transient)
