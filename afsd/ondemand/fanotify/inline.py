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

import logging
from pathlib import Path

from afsd.errors import AfsdError
from afsd.ondemand.fanotify.model import Blob
from afsd.ondemand.sinks import hole_sink
from afsd.ondemand.sources import LocalFileSource

Run = tuple[int, int]   # (first chunk, chunk count)


class InlineFills:
    def __init__(self, limit: int, log: logging.Logger) -> None:
        self.limit = limit
        self.log = log
        self._sources: dict[str, LocalFileSource | None] = {}   # by blob name

    def forget(self, blob: Blob) -> None:
        self._sources.pop(blob.name, None)

    def source_of(self, blob: Blob) -> LocalFileSource | None:
        """The blob's source when it can be filled here (a "file" source), else None."""
        if blob.name not in self._sources:
            path = blob.source.get("kind") == "file" and blob.source.get("path")
            self._sources[blob.name] = LocalFileSource(blob.spec, Path(path)) if isinstance(path, str) else None
        return self._sources[blob.name]

    def fill(self, blob: Blob, runs: tuple[Run, ...]) -> tuple[int, str] | None:
        """Fill `runs` of `blob` now if they may be: (bytes written, "" or why it failed); None when they
        are for a worker (no local source, too large, not being served)."""
        chunk = blob.spec.chunk_size
        wanted = sum(min(blob.spec.size, (first + count) * chunk) - first * chunk for first, count in runs)
        if not self.limit or wanted > self.limit or blob.fill_fd is None:
            return None
        source = self.source_of(blob)
        if source is None:
            return None
        sink = hole_sink(blob.fill_fd, blob.spec.size)   # (never closed: the fill fd is the supervisor's)
        written = 0
        try:
            for first, count in runs:
                start = first * chunk
                written += source.fill_now(start, min(blob.spec.size, (first + count) * chunk) - start, sink)
        except (OSError, AfsdError, ValueError) as e:
            return written, str(e) or type(e).__name__
        return written, ""
