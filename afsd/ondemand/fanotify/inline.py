"""Fills the fanotify supervisor does itself: a miss in a blob whose source is a complete copy on this
machine (the "file" kind, `LocalFileSource`) is read, checked and written in the supervisor's own loop,
with no fetch worker in between, when it needs at most `inline_fill` bytes.

Why: a miss that goes through a worker costs two socket messages and four process wake-ups (supervisor,
worker, supervisor, reader) where a local read costs tens of microseconds; for a small read from this
machine's own disk that hop is nearly all of the reader's wait. What stays out: anything over the network
(a provider that stalls must never stall the loop that answers every reader, and the gRPC stack stays out
of this process) and large fills (they would hold up every other event for milliseconds).

Crash safety is unchanged: the event is journaled before the fill starts, and a fill only writes holes of
verified chunks through the fill fd, as a worker would; if the supervisor dies midway, its successor finds
the journaled event and fills what is still a hole.
"""

from __future__ import annotations

import errno
import logging
import os
from dataclasses import dataclass
from typing import Any

from afsd.ondemand.fanotify.model import Blob
from afsd.ondemand.fanotify.shim import ffi, lib

Run = tuple[int, int]   # (first chunk, chunk count)

# afsd_serve_local's outcomes (c_ext/afsd_fanotify.h)
PRESENT, FILLED, NOT_HERE = 1, 2, 0
# What its own error codes mean.
_WHY = {errno.EBADMSG: "a chunk does not match the blob's chunk digest", errno.ENODATA: "the file ends before the range",
        errno.EINVAL: "a range outside the blob's chunks", errno.EAGAIN: "the range still has a hole after the fill"}


@dataclass
class Served:
    """What became of an event `InlineFills.serve` was given."""

    outcome: int            # PRESENT or FILLED (answered: FAN_ALLOW), NOT_HERE (nothing done), or -1 (failed)
    written: int = 0
    chunks: Run = (0, 0)    # the chunks it filled, or failed to
    error: str = ""


@dataclass
class _Local:
    """What filling one blob here takes, made at its first miss and kept: the C call's struct (the blob's
    fds, sizes and digests set once), the digests it points at, and the complete copy's fd."""

    fill_fd: int                  # the blob's fill fd it was made for
    path: str                     # the complete copy
    digests: bytes                # the chunk table's SHA-256 digests end to end (the struct points at them)
    blob: Any                     # struct afsd_local_blob *
    source_fd: int | None = None  # opened at the first fill (the file may be missing until then)


class InlineFills:
    def __init__(self, limit: int, group_fd: int, log: logging.Logger) -> None:
        self.limit = limit
        self.group_fd = group_fd
        self.log = log
        self._local: dict[str, _Local | None] = {}   # by blob name; None: not a "file" source

    def forget(self, blob: Blob) -> None:
        """Drop what filling `blob` here kept (its source fd): it is complete or no longer served."""
        local = self._local.pop(blob.name, None)
        if local is not None and local.source_fd is not None:
            os.close(local.source_fd)

    def local(self, blob: Blob) -> _Local | None:
        """What fills `blob` here (it has a "file" source and is being served), else None."""
        fill_fd = blob.fill_fd
        if not self.limit or fill_fd is None:
            return None
        local = self._local.get(blob.name, False)
        if local is False or local is not None and local.fill_fd != fill_fd:   # new, or registered again
            self.forget(blob)
            path = blob.source.get("kind") == "file" and blob.source.get("path")
            local = None
            if isinstance(path, str):
                digests = b"".join(blob.spec.chunk_digests)
                local = _Local(fill_fd, path, digests, ffi.new("struct afsd_local_blob *"))
                local.blob.group_fd, local.blob.fill_fd, local.blob.source_fd = self.group_fd, fill_fd, -1
                local.blob.chunk_size, local.blob.size, local.blob.limit = (blob.spec.chunk_size, blob.spec.size,
                                                                            self.limit)
                local.blob.digests, local.blob.digests_size = ffi.from_buffer(digests), len(digests)
            self._local[blob.name] = local
        return local

    def serve(self, local: _Local, event_fd: int, start: int, end: int) -> Served:
        """Answer a (journaled) event reading [start, end) of the blob if its bytes are there, or once they
        are filled from the local copy; NOT_HERE when that fill would exceed `inline_fill` bytes."""
        c = local.blob
        if not self._open(local):
            return Served(-1, error=f"cannot open the local file {local.path}")
        c.event_fd, c.start, c.end = event_fd, start, end
        outcome = lib.afsd_serve_local(c)
        chunk = c.chunk_size
        chunks = (c.filled_start // chunk, -(-c.filled_end // chunk) - c.filled_start // chunk)
        if outcome >= 0:
            return Served(outcome, c.written, chunks)
        return Served(-1, c.written, chunks, self._failed(local, -outcome))

    def fill(self, blob: Blob, runs: tuple[Run, ...]) -> tuple[int, str] | None:
        """Fill `runs` of `blob` now if they may be: (bytes written, "" or why it failed); None when they
        are for a worker (no local source, too large, not being served)."""
        chunk = blob.spec.chunk_size
        size = blob.spec.size
        wanted = sum(min(size, (first + count) * chunk) - first * chunk for first, count in runs)
        local = self.local(blob) if wanted <= self.limit else None
        if local is None:
            return None
        if not self._open(local):
            return 0, f"cannot open the local file {local.path}"
        written = 0
        for first, count in runs:
            result = lib.afsd_fill_local(local.blob, first * chunk, min(size, (first + count) * chunk))
            if result < 0:
                return written, self._failed(local, -result)
            written += result
        return written, ""

    def _open(self, local: _Local) -> bool:
        if local.source_fd is None:
            try:
                local.source_fd = os.open(local.path, os.O_RDONLY | os.O_CLOEXEC)
            except OSError as e:
                self.log.error("cannot open the local copy %s: %s", local.path, e)
                return False
            local.blob.source_fd = local.source_fd
        return True

    def _failed(self, local: _Local, code: int) -> str:
        """Why a fill failed; the next one opens the file again (it may have been replaced)."""
        if local.source_fd is not None:
            os.close(local.source_fd)
            local.source_fd = None
            local.blob.source_fd = -1
        return f"local file {local.path}: {_WHY.get(code, os.strerror(code))}"
