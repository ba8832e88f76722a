"""Building a RangeSource from plain JSON settings, in a fetch worker of either supervised backend.

The node daemon registers a blob with a `source` configuration (JSON, it crosses process boundaries:
`BlobSource.config`); each fetch worker (fanotify/worker.py, cachefiles/worker.py) turns it into a
`RangeSource` with `SourceFactory.make`:

    {"kind": "cluster", "discovery": ["host:port", ...], "local_endpoint": "host:port" | null,
     "node_id": "...", "tls": {"ca", "cert", "key": paths} | null,
     "options": {<RangeFetcher keyword arguments: call_timeout, min_request, ...>}}
        -> afsd.cluster.fetcher.RangeFetcher (peer layerstores, failover, leases)
    {"kind": "file", "path": "/complete/blob"}
        -> LocalFileSource: a complete copy on this machine, checked chunk by chunk
    {"kind": "import", "factory": "package.module:callable", "sys_path": [...], "args": {...}}
        -> callable(spec, **args): for tests (fault-injecting sources) and experiments
"""

from __future__ import annotations

import asyncio
import importlib
import os
import sys
from pathlib import Path
from typing import Any

from afsd.errors import AfsdError
from afsd.ondemand.spec import BlobSpec, FetchedRange, Priority, RangeSource


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


class SourceFactory:
    """Makes RangeSources; cluster sources of one worker share gRPC channels and discovery clients."""

    def __init__(self) -> None:
        self._channels: Any = None
        self._discovery: dict[tuple[str, ...], Any] = {}

    def make(self, spec: BlobSpec, config: dict[str, Any]) -> RangeSource:
        kind = config.get("kind")
        if kind == "file":
            return LocalFileSource(spec, Path(config["path"]))
        if kind == "cluster":
            return self._cluster(spec, config)
        if kind == "import":
            for entry in config.get("sys_path", []):
                if entry not in sys.path:
                    sys.path.insert(0, entry)
            module_name, _, attribute = str(config["factory"]).partition(":")
            factory = getattr(importlib.import_module(module_name), attribute)
            return factory(spec, **config.get("args", {}))
        raise SourceConfigError(f"blob {spec.name}: unknown source kind {kind!r} (expected cluster, file or import)")

    def _cluster(self, spec: BlobSpec, config: dict[str, Any]) -> RangeSource:
        # Imported here: the cluster stack (grpc, protos) is only needed by workers that use it.
        from afsd.cluster.discovery_client import DiscoveryClient
        from afsd.cluster.fetcher import RangeFetcher
        from afsd.rpc import ChannelPool
        from afsd.trust.tls import TlsConfig

        if self._channels is None:   # one worker serves one node: its TLS files are the same for every blob
            self._channels = ChannelPool(TlsConfig.from_json(config.get("tls")))
        endpoints = tuple(config.get("discovery") or ())
        discovery = None
        if endpoints:
            discovery = self._discovery.get(endpoints)
            if discovery is None:
                discovery = self._discovery[endpoints] = DiscoveryClient(list(endpoints), self._channels)
        return RangeFetcher(spec, discovery=discovery, channels=self._channels,
                            local_endpoint=config.get("local_endpoint"), node_id=config.get("node_id", ""),
                            **config.get("options", {}))

    async def close(self) -> None:
        if self._channels is not None:
            await self._channels.close()
