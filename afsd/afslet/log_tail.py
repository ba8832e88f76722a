"""The last log frames of one execution, kept for `afsd logs ID` (Executions.Logs), with followers.

Every frame an Execute call sends to its client is also appended here (source, message, time). The
tail is bounded by lines and by bytes; the oldest frames leave first. Frames are numbered, so a
follower asks for "everything after number N" and learns how many it missed if it fell behind the
bound: a slow follower never slows the execution (appending never waits), it loses lines and is told.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass


@dataclass(frozen=True)
class TailLine:
    seq: int
    source: str
    message: str
    unix_ms: int


class LogTail:
    """Used from the event loop only."""

    def __init__(self, max_lines: int = 1000, max_bytes: int = 256 * 1024) -> None:
        self.max_lines = max_lines
        self.max_bytes = max_bytes
        self._lines: deque[TailLine] = deque()
        self._bytes = 0
        self._next_seq = 0
        self._closed = False
        self._changed: asyncio.Future[None] | None = None

    @property
    def next_seq(self) -> int:
        return self._next_seq

    @property
    def closed(self) -> bool:
        return self._closed

    def append(self, source: str, message: str) -> None:
        line = TailLine(self._next_seq, source, message, int(time.time() * 1000))
        self._next_seq += 1
        self._lines.append(line)
        self._bytes += len(message) + len(source)
        while self._lines and (len(self._lines) > self.max_lines or self._bytes > self.max_bytes):
            old = self._lines.popleft()
            self._bytes -= len(old.message) + len(old.source)
        self._wake()

    def close(self) -> None:
        """No more frames will come (the call has ended): followers finish."""
        self._closed = True
        self._wake()

    def last(self, count: int = 0) -> list[TailLine]:
        """The last `count` kept frames (all kept ones for 0)."""
        lines = list(self._lines)
        return lines[-count:] if count > 0 else lines

    def after(self, seq: int) -> tuple[list[TailLine], int]:
        """Frames numbered `seq` and later that are still kept, and how many of those were dropped."""
        first_kept = self._lines[0].seq if self._lines else self._next_seq
        dropped = max(0, first_kept - seq)
        return [line for line in self._lines if line.seq >= seq], dropped

    async def wait_beyond(self, seq: int) -> None:
        """Until a frame numbered `seq` or later exists, or the tail is closed."""
        while self._next_seq <= seq and not self._closed:
            if self._changed is None or self._changed.done():
                self._changed = asyncio.get_running_loop().create_future()
            # shielded: one follower that goes away must not cancel the future the others wait on
            await asyncio.shield(self._changed)

    def _wake(self) -> None:
        if self._changed is not None and not self._changed.done():
            self._changed.set_result(None)
        self._changed = None
