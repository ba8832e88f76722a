"""Where a fetch worker of either supervised backend gets a blob's bytes: a `SourceFactory` turns a blob's
source configuration (plain JSON, it crosses process boundaries: `BlobSource.config`) into a RangeSource.

The factory is injected, as stargz-snapshotter injects its sources (`WithGetSources`): whoever starts a
supervisor names it in the supervisor's settings (`sources`, "module:callable" returning a SourceFactory,
and optionally `sources_path`, a directory to import it from), and every fetch worker loads it with
`load_source_factory`. This package knows only the one kind every node has:

    {"kind": "file", "path": "/complete/blob"}  -> LocalFileSource: a complete copy on this machine

The node daemon's factory adds {"kind": "cluster", ...} (afsd/cluster/sources.py: peer layerstores with
failover); tests inject factories of their own (fault-injecting sources).
"""

from __future__ import annotations

import asyncio
import errno
import importlib
import logging
import mmap
import os
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from afsd.errors import AfsdError
from afsd.ondemand.metadata import check_metadata
from afsd.ondemand.spec import BlobSink, BlobSpec, FetchedRange, FetchedSpans, Filled, Priority, RangeSource

FILE_SOURCES = "afsd.ondemand.sources:FileSources"
PIECE_BYTES = 4 << 20        # a file source reads and checks this much at once (whole chunks, at least one)
PAGE = 4096


class SourceConfigError(AfsdError):
    """A blob's source configuration cannot be turned into a RangeSource."""


class LocalFileSource:
    """Verified ranges of a complete blob file on this machine."""

    def __init__(self, spec: BlobSpec, path: Path, *, direct: bool = False) -> None:
        self.spec = spec
        self.path = path
        self.table = spec.chunk_table()
        self.label = f"file:{path}"
        # `fill_now` reads with O_DIRECT: no copy of the blob in the page cache and no kernel copy out of
        # it (the fscache worker: afsd/ondemand/cachefiles/worker.py); buffered where the file's
        # filesystem refuses O_DIRECT.
        self.direct = direct
        self._buffers = threading.local()   # each thread reads into its own, reused (page-aligned: O_DIRECT)

    async def fetch(self, offset: int, length: int, priority: Priority = Priority.DEMAND) -> FetchedRange:
        start, count = self.table.widen(offset, length)
        data = await asyncio.to_thread(self._read_checked, start, count)
        return FetchedRange(offset=start, data=data, source=self.label)

    async def fill(self, offset: int, length: int, priority: Priority, sink: BlobSink) -> Filled:
        start, count = self.table.widen(offset, length)
        written = await asyncio.to_thread(self.fill_now, start, count, sink)
        return Filled(start, count, written, self.label)

    async def fetch_metadata(self, spans: Sequence[tuple[int, int]]) -> FetchedSpans:
        """The bytes of `spans`, checked against the blob's metadata digest (afsd/ondemand/metadata.py)."""
        return FetchedSpans(tuple(spans), await asyncio.to_thread(self._read_metadata, spans), self.label)

    def _read_metadata(self, spans: Sequence[tuple[int, int]]) -> bytes:
        data = bytearray(sum(length for _, length in spans))
        fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            at = 0
            for offset, length in spans:
                read_into(fd, memoryview(data)[at:at + length], offset, self.path)
                at += length
        finally:
            os.close(fd)
        check_metadata(self.spec.metadata_ranges(), self.spec.metadata_digest, spans, data,
                       source=f"local file {self.path}")
        return bytes(data)

    def fill_now(self, start: int, count: int, sink: BlobSink) -> int:
        """Blocking: [start, start + count) (whole chunks) read piece by piece into this thread's buffer,
        each piece checked, then handed to `sink`; the bytes the sink wrote."""
        chunk = self.table.chunk_size
        piece = max(chunk, PIECE_BYTES - PIECE_BYTES % chunk)
        buffer = self._buffer(min(piece, count))
        written = 0
        fd, direct = self._open()
        try:
            for at in range(start, start + count, piece):
                view = buffer[:min(piece, start + count - at)]
                if direct:
                    try:
                        read_direct(fd, buffer, len(view), at, self.path)
                    except OSError as e:
                        if e.errno != errno.EINVAL:
                            raise
                        self.direct = direct = False   # alignment this filesystem does not take: buffered
                        os.close(fd)
                        fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
                if not direct:
                    read_into(fd, view, at, self.path)
                self.table.check(at, view, source=f"local file {self.path}")
                written += sink.write(at, view)
        finally:
            os.close(fd)
        return written

    def _open(self) -> tuple[int, bool]:
        """The file opened for `fill_now`, and whether with O_DIRECT."""
        if self.direct:
            try:
                return os.open(self.path, os.O_RDONLY | os.O_CLOEXEC | os.O_DIRECT), True
            except OSError as e:
                if e.errno != errno.EINVAL:   # (EINVAL: this filesystem has no O_DIRECT)
                    raise
                self.direct = False
        return os.open(self.path, os.O_RDONLY | os.O_CLOEXEC), False

    def _read_checked(self, start: int, count: int) -> bytes:
        data = read_exactly(self.path, start, count)
        self.table.check(start, data, source=f"local file {self.path}")
        return data

    def _buffer(self, size: int) -> memoryview:
        """This thread's buffer of at least `size` bytes, rounded up to whole pages (mmap: page-aligned)."""
        buffer: mmap.mmap | None = getattr(self._buffers, "buffer", None)
        if buffer is None or len(buffer) < size:
            buffer = self._buffers.buffer = mmap.mmap(-1, round_up(size, PAGE))
        return memoryview(buffer)

    async def close(self) -> None:
        pass


def read_exactly(path: Path, offset: int, count: int) -> bytes:
    """The file's bytes from `offset` (pread's own bytes: no buffer to copy them out of); OSError if it ends first."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        data = os.pread(fd, count, offset)
        while len(data) < count:
            more = os.pread(fd, count - len(data), offset + len(data))
            if not more:
                raise OSError(f"{path} ends at {offset + len(data)}, before byte {offset + count}")
            data += more
        return data
    finally:
        os.close(fd)


def round_up(value: int, unit: int) -> int:
    return -(-value // unit) * unit


def read_direct(fd: int, buffer: memoryview, count: int, offset: int, path: Path) -> None:
    """Fill `buffer[:count]` with the file's bytes from page-aligned `offset` through an O_DIRECT `fd`
    (`buffer` page-aligned, whole pages: each read asks for whole pages, the last may end at the file's end)."""
    done = 0
    while done < count:
        got = os.preadv(fd, [buffer[done:round_up(count, PAGE)]], offset + done)
        if not got:
            raise OSError(f"{path} ends at {offset + done}, before byte {offset + count}")
        done += got


def read_into(fd: int, view: memoryview, offset: int, path: Path) -> None:
    """Fill `view` with the file's bytes from `offset`; OSError if the file ends first."""
    done = 0
    while done < len(view):
        count = os.preadv(fd, [view[done:]], offset + done)
        if not count:
            raise OSError(f"{path} ends at {offset + done}, before byte {offset + len(view)}")
        done += count


async def fill_from(source: RangeSource, offset: int, length: int, priority: Priority, sink: BlobSink) -> Filled:
    """[offset, offset + length) of `source`'s blob into `sink`, verified: with the source's own `fill`
    where it has one (pieces go to the sink as they arrive), else fetched and written at once (a thread)."""
    fill = getattr(source, "fill", None)
    if fill is not None:
        filled: Filled = await fill(offset, length, priority, sink)
    else:
        fetched = await source.fetch(offset, length, priority)
        written = await asyncio.to_thread(sink.write, fetched.offset, memoryview(fetched.data))
        filled = Filled(fetched.offset, len(fetched.data), written, fetched.source, fetched.stats)
    filled.require_covers(offset, offset + length)
    return filled


class SourceFactory(Protocol):
    """Makes the RangeSources of one fetch worker process (they may share connections)."""

    def make(self, spec: BlobSpec, config: dict[str, Any]) -> RangeSource:
        """A source of `spec`'s verified bytes from its configuration; SourceConfigError if it names
        nothing this factory knows."""

    def preload(self) -> None:
        """Import what making a source will need (a worker calls it in a thread as it starts, so the first
        fill, a reader waiting, does not pay for it)."""

    async def close(self) -> None:
        """Release what the sources shared (after every source is closed)."""

    def metrics(self) -> dict[str, float]:
        """What this process's sources counted, as totals (a worker reports them to its supervisor, and
        the node daemon shows them as its own: afsd/cluster/fetch_metrics.py)."""


class FileSources:
    """The "file" kind; factories of other kinds extend it."""

    def make(self, spec: BlobSpec, config: dict[str, Any]) -> RangeSource:
        kind = config.get("kind")
        if kind == "file":
            return LocalFileSource(spec, Path(config["path"]))
        raise SourceConfigError(f"blob {spec.name}: unknown source kind {kind!r} (this worker's sources are "
                                f"{type(self).__module__}:{type(self).__qualname__})")

    def preload(self) -> None:
        pass

    async def close(self) -> None:
        pass

    def metrics(self) -> dict[str, float]:
        return {}


class UnavailableSources:
    """What a worker whose source factory failed to load uses: every fill fails, saying why (readers get
    EIO and the log says what to fix, instead of a worker that dies and is restarted forever)."""

    def __init__(self, reason: str) -> None:
        self.reason = reason

    def make(self, spec: BlobSpec, config: dict[str, Any]) -> RangeSource:
        raise SourceConfigError(f"blob {spec.name}: {self.reason}")

    def preload(self) -> None:
        pass

    async def close(self) -> None:
        pass

    def metrics(self) -> dict[str, float]:
        return {}


def load_source_factory(reference: str, path: str = "") -> SourceFactory:
    """The factory `reference` ("module:callable") names, imported (from `path` first, if given) and called."""
    module_name, _, attribute = reference.partition(":")
    if path and path not in sys.path:
        sys.path.insert(0, path)
    try:
        make = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError, ValueError) as e:
        raise SourceConfigError(f"cannot load the source factory {reference!r}: {e}") from None
    return make()


async def preload_sources(factory: SourceFactory, log: logging.Logger) -> None:
    """`factory.preload()` in a thread, for a worker that just started; a failure is only logged (making a
    source will fail the same way, and say so)."""
    try:
        await asyncio.to_thread(factory.preload)
    except Exception as e:   # noqa: BLE001 - only a head start
        log.warning("preloading the sources failed: %s", e)


def worker_sources(reference: str, path: str, log: logging.Logger) -> SourceFactory:
    """A worker's source factory; if it cannot be loaded, one whose every source fails saying why."""
    try:
        return load_source_factory(reference, path)
    except SourceConfigError as e:
        log.error("%s: every fill will fail", e)
        return UnavailableSources(str(e))
