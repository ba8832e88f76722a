"""When a cold blob's startup is over, so its whole-blob background fill may begin.

A task's start reads a few percent of its image as a burst of small misses. A background fill of the whole
blob, started at mount, takes the fetch workers, the link and a core from under those misses (measured on
a 2-core node, cold starts through the proxy, same run: a numpy import 840, 1,037, 2,793 ms with the fill
racing it, 717, 677, 824 ms with it held back). So the fill waits until the startup is over:
- when the blob's first reads are recorded (the cluster learns from them), the recording's window decides
  (afsd/ondemand/trace.py `TraceRecorder.startup_over`): a fill would also hide the reads it must see;
- otherwise a `StartupGate`: over once no read has reached the blob for `quiet` seconds while no reader
  waits for a fill (a reader stalled on a slow fill is still starting), or `window` seconds after its first
  read whatever happens (a task that never stops reading still gets the rest of its blob).
The fill always starts in the end: a blob nobody reads opens its gate `quiet` seconds after registering.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from afsd.ondemand.trace import DEFAULT_WINDOW

if TYPE_CHECKING:
    from afsd.ondemand.fanotify.model import Blob


class StartupGate:
    """The startup of one blob whose first reads are not recorded (times in monotonic seconds)."""

    def __init__(self, quiet: float, window: float = DEFAULT_WINDOW, *, created: float | None = None) -> None:
        self.quiet = quiet
        self.window = window
        self.last_activity = time.monotonic() if created is None else created
        self.first_read: float | None = None
        self.opened = False

    def read(self, now: float) -> None:
        """A read of the blob reached the backend at `now`."""
        if self.first_read is None:
            self.first_read = now
        self.last_activity = max(self.last_activity, now)

    def over(self, now: float, *, waiting: bool) -> bool:
        """Whether the startup is over at `now`; `waiting`: some reader of the blob waits for a fill now.
        Once over, it stays over."""
        if not self.opened:
            if waiting:
                self.last_activity = max(self.last_activity, now)
            self.opened = (now - self.last_activity > self.quiet
                           or (self.first_read is not None and now - self.first_read > self.window))
        return self.opened


def startup_gate(blob: Blob, *, record: float, quiet: float) -> StartupGate | None:
    """The gate of a blob just registered: none when nothing holds its fill back (no background fill, a
    recording's window decides, or `quiet` is 0)."""
    return StartupGate(quiet) if blob.prefetch and record <= 0 and quiet > 0 else None


def startup_over(blob: Blob, now: float) -> bool:
    """Whether `blob`'s whole-blob background fill may run at `now` (its startup is over)."""
    if blob.recorder is not None:
        return blob.recorder.startup_over(now)
    return blob.startup is None or blob.startup.over(now, waiting=bool(blob.pending))
