"""Where the time of one request goes, phase by phase, without threading a timer through every call.

The node daemon opens a `PhaseLog` for a mount (`recording()`); code anywhere below it, in the same asyncio
task or in tasks it starts (contextvars are copied into them), wraps its steps in `phase("name")`. Phases of
layers attached in parallel overlap: each phase's milliseconds are summed over its occurrences, so a phase
can add up to more than the wall time; `summary()` gives both.
"""

from __future__ import annotations

import contextlib
import contextvars
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

_current: contextvars.ContextVar[PhaseLog | None] = contextvars.ContextVar("afsd_phase_log", default=None)


@dataclass
class PhaseLog:
    started: float = field(default_factory=time.monotonic)
    milliseconds: dict[str, float] = field(default_factory=dict)   # by phase, in first-seen order

    def add(self, name: str, seconds: float) -> None:
        self.milliseconds[name] = self.milliseconds.get(name, 0.0) + seconds * 1000

    def summary(self) -> str:
        """"resolve=12.0 attach=310.5 ... total=400.1" (ms)."""
        total = (time.monotonic() - self.started) * 1000
        return " ".join(f"{name}={ms:.1f}" for name, ms in [*self.milliseconds.items(), ("total", total)])


@contextlib.contextmanager
def recording() -> Iterator[PhaseLog]:
    """Collect the phases of what runs inside (in this task and the tasks it starts)."""
    log = PhaseLog()
    token = _current.set(log)
    try:
        yield log
    finally:
        _current.reset(token)


@contextlib.contextmanager
def phase(name: str) -> Iterator[None]:
    """Time the block into the current PhaseLog (nothing when none is recording)."""
    log = _current.get()
    if log is None:
        yield
        return
    started = time.monotonic()
    try:
        yield
    finally:
        log.add(name, time.monotonic() - started)
