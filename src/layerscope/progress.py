"""Progress lines a user can ``tail -f`` in a shard's log.

A shard job's stdout/stderr go to a log file (the rule's ``log:``), where a tqdm bar would be a
stream of carriage returns. This reporter writes whole, flushed lines instead::

    layerscope progress: dinov3_channels tiny/0of2: 12/40 items (30.0%) 3.1 items/s ETA 9s

at most every ``LAYERSCOPE_PROGRESS_SECONDS`` seconds (default 10; 0 prints every update), plus
always the first and the last update, so a long shard shows it is alive and how long it has left.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Callable, TextIO

__all__ = ["Progress", "format_eta", "current", "set_current"]


def format_eta(seconds: float) -> str:
    """'2h03m', '4m05s', '9s', or '?' when unknown."""
    if not seconds == seconds or seconds < 0 or seconds == float("inf"):
        return "?"
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600}h{(s % 3600) // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s}s"


class Progress:
    """Counts items done out of ``total`` and prints rate and ETA as plain log lines.

    Why not tqdm: its bar rewrites one line with carriage returns, which a log file keeps as one
    endless line; a cluster user tails the log, so each report is a complete, flushed line."""

    def __init__(self, label: str, total: int, unit: str = "items", every: float | None = None,
                 stream: TextIO | None = None, clock: Callable[[], float] = time.monotonic, start: int = 0) -> None:
        self.label = label
        self.total = int(total)
        self.unit = unit
        self.every = float(os.environ.get("LAYERSCOPE_PROGRESS_SECONDS", "10")) if every is None else float(every)
        self.stream = stream
        self.clock = clock
        self.t0 = clock()
        self.start = int(start)  # items already done before this process (a resumed run): not in the rate
        self.done = int(start)
        self._last = -float("inf")
        self.lines = 0

    def line(self) -> str:
        el = self.clock() - self.t0
        new = self.done - self.start
        rate = new / el if el > 0 else float("nan")
        eta = (self.total - self.done) / rate if rate and rate == rate and rate > 0 else float("nan")
        pct = 100.0 * self.done / self.total if self.total else 100.0
        return (f"layerscope progress: {self.label}: {self.done}/{self.total} {self.unit} ({pct:.1f}%) "
                f"{rate:.3g} {self.unit}/s ETA {format_eta(0.0 if self.done >= self.total else eta)}")

    def update(self, n: int = 1) -> None:
        """``n`` more items done; print a line if ``every`` seconds passed, or on the first/last."""
        self.done += int(n)
        now = self.clock()
        if self.lines == 0 or self.done >= self.total or now - self._last >= self.every:
            self._last = now
            self.lines += 1
            stream = self.stream or sys.stderr
            print(self.line(), file=stream, flush=True)


_CURRENT: list[str] = [""]


def set_current(label: str) -> None:
    """The running shard's label (probe model/shard), set by ``layerscope run-shard``."""
    _CURRENT[0] = label


def current(total: int, unit: str = "items", start: int = 0) -> Progress:
    """A reporter labelled with the running shard (probes call this in their batch loops)."""
    return Progress(_CURRENT[0] or "shard", total, unit, start=start)
