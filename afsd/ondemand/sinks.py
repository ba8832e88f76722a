"""Sinks for fills (`afsd.ondemand.spec.BlobSink`): an fd that verified bytes are written through, from
the threads a source receives them in, closed only once no such write still uses it.

Why the guard: a fill's pieces are written by the source's threads (afsd/cluster/bytestream_client.py
receives and writes in one thread), which may still be writing when the task that asked for the fill is
cancelled, or its blob dropped. Closing the fd under such a write would let its number be reused by
another open file and the write land there; so `close()` only marks the sink closed when a write is in
progress, and the last write closes the fd.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable

from afsd.ondemand.sparse import write_holes


class FdSink:
    """A BlobSink writing through `fd` with `put(fd, offset, data) -> bytes written`; `on_written(offset,
    length, written)` (called in the writing thread) learns of each range now in place and of the bytes
    this write put there (holes it filled; bytes already present are not rewritten)."""

    def __init__(self, fd: int, size: int, put: Callable[[int, int, memoryview], int],
                 on_written: Callable[[int, int, int], None] | None = None) -> None:
        self.fd = fd
        self.size = size
        self._put = put
        self._on_written = on_written
        self._lock = threading.Lock()
        self._writes = 0
        self._closed = False

    def write(self, offset: int, data: memoryview) -> int:
        with self._lock:
            if self._closed:
                raise RuntimeError("the file this fill was writing into was closed")
            self._writes += 1
        try:
            written = self._put(self.fd, offset, data)
        finally:
            with self._lock:
                self._writes -= 1
                last = self._closed and self._writes == 0
            if last:
                os.close(self.fd)
        if self._on_written is not None:
            self._on_written(offset, min(len(data), self.size - offset), written)
        return written

    def close(self) -> None:
        """Close the fd now, or when the write in progress ends; later writes fail."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            now = self._writes == 0
        if now:
            os.close(self.fd)


def hole_sink(fd: int, size: int, on_written: Callable[[int, int, int], None] | None = None) -> FdSink:
    """A blob file's fill fd as a sink that writes only holes (bytes a reader may already see stay)."""
    return FdSink(fd, size, lambda fd, offset, data: write_holes(fd, offset, data, size), on_written)
