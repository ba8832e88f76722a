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
import importlib
import logging
import os
import sys
from pathlib import Path
from typing import Any, Protocol

from afsd.errors import AfsdError
from afsd.ondemand.spec import BlobSpec, FetchedRange, Priority, RangeSource

FILE_SOURCES = "afsd.ondemand.sources:FileSources"


class SourceConfigError(AfsdError):
    """A blob's source configuration cannot be turned into a RangeSource."""


class LocalFileSource:
    """Verified ranges of a complete blob file on this machine."""

    def __init__(self, spec: BlobSpec, path: Path) -> None:
        self.spec = spec
        self.path = path
        self.table = spec.chunk_table()

    async def fetch(self, offset: int, length: int, priority: Priority = Priority.DEMAND) -> FetchedRange:
        start, count = self.table.widen(offset, length)
        data = await asyncio.to_thread(read_exactly, self.path, start, count)
        await asyncio.to_thread(self.table.check, start, data, source=f"local file {self.path}")
        return FetchedRange(offset=start, data=data, source=f"file:{self.path}")

    async def close(self) -> None:
        pass


def read_exactly(path: Path, offset: int, count: int) -> bytes:
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


class SourceFactory(Protocol):
    """Makes the RangeSources of one fetch worker process (they may share connections)."""

    def make(self, spec: BlobSpec, config: dict[str, Any]) -> RangeSource:
        """A source of `spec`'s verified bytes from its configuration; SourceConfigError if it names
        nothing this factory knows."""

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


def worker_sources(reference: str, path: str, log: logging.Logger) -> SourceFactory:
    """A worker's source factory; if it cannot be loaded, one whose every source fails saying why."""
    try:
        return load_source_factory(reference, path)
    except SourceConfigError as e:
        log.error("%s: every fill will fail", e)
        return UnavailableSources(str(e))
