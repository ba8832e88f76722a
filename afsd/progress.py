"""How far long work is, in words a person reads: bytes done of the total, and the rate.

Shared by the command line's progress display (afsd/cli/_progress.py: bars on a terminal, plain lines
otherwise) and by daemons, which log a line now and then for a long layer download or conversion
(`ProgressLog`). Rates are averages since the stage began: steadier than instantaneous ones.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

MB = 1_000_000
MIN_RATE_SECONDS = 0.5   # a rate over less time than this says nothing


def megabytes(count: int) -> str:
    return f"{count / MB:.1f} MB"


class StageMeter:
    """Bytes done of a total in one stage of one item (e.g. downloading a layer), with its rate."""

    def __init__(self, stage: str, total: int = 0, clock: Callable[[], float] = time.monotonic) -> None:
        self.stage, self.total, self.done = stage, total, 0
        self._clock = clock
        self.started = clock()

    def update(self, done: int, total: int = 0) -> None:
        self.done = done
        self.total = total or self.total

    @property
    def elapsed(self) -> float:
        return self._clock() - self.started

    @property
    def fraction(self) -> float | None:
        return min(1.0, self.done / self.total) if self.total else None

    def rate(self) -> float:
        """Bytes per second since the stage began."""
        return self.done / self.elapsed if self.elapsed > 0 else 0.0

    def describe(self) -> str:
        """`downloading 12.3 of 45.6 MB (27%), 7.8 MB/s` (the rate once there is one); a stage without
        bytes says how long it has run."""
        if not self.total and not self.done:
            return f"{self.stage} ({self.elapsed:.0f}s)"
        amount = f"{self.done / MB:.1f} of {megabytes(self.total)}" if self.total else megabytes(self.done)
        share = f" ({100 * self.fraction:.0f}%)" if self.fraction is not None else ""
        rate = f", {self.rate() / MB:.1f} MB/s" if self.elapsed >= MIN_RATE_SECONDS else ""
        return f"{self.stage} {amount}{share}{rate}"


class ProgressLog:
    """For daemons: a log line about a long-running item at most every `interval` seconds (none at all
    for work that ends sooner). Thread-safe: conversions report from a worker thread."""

    def __init__(self, log: logging.Logger, what: str, interval: float = 10.0) -> None:
        self._log, self._what, self._interval = log, what, interval
        self._meter: StageMeter | None = None
        self._last = time.monotonic()
        self._lock = threading.Lock()

    def __call__(self, stage: str, done: int, total: int) -> None:
        with self._lock:
            if self._meter is None or self._meter.stage != stage:
                self._meter = StageMeter(stage, total)
            self._meter.update(done, total)
            now = time.monotonic()
            if now - self._last >= self._interval:
                self._last = now
                self._log.info("%s: %s", self._what, self._meter.describe())
