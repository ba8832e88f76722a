"""The source factory of the fscache worker tests, `TestSources` (the lab's supervisors inject it into their
workers: tests/vm/test_cachefiles_helpers.py; how injection works: afsd/ondemand/sources.py); no tests here.
It serves the cluster's kinds and "file", plus "gated" for `GatedFileSource`.

`GatedFileSource` serves a complete local blob like the "file" source, but every fetch after the first
`open_fetches` (counted per worker process) waits until the file `gate` exists: a test can thus be sure a
READ is in flight inside the worker when it kills it. Kept free of heavy imports: the worker loads it
(afsd.cluster.sources loads the gRPC stack only for a "cluster" source).
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

from afsd.cluster.sources import ClusterSources
from afsd.ondemand.sources import LocalFileSource
from afsd.ondemand.spec import BlobSpec, FetchedRange, Priority, RangeSource


class GatedFileSource:
    def __init__(self, spec: BlobSpec, *, path: str, gate: str, open_fetches: int = 0) -> None:
        self.inner = LocalFileSource(spec, Path(path))
        self.gate = gate
        self.open_fetches = open_fetches
        self.fetches = 0

    async def fetch(self, offset: int, length: int, priority: Priority = Priority.DEMAND) -> FetchedRange:
        self.fetches += 1
        if self.fetches > self.open_fetches:
            while not os.path.exists(self.gate):
                await asyncio.sleep(0.05)
        return await self.inner.fetch(offset, length, priority)

    async def close(self) -> None:
        pass


class TestSources(ClusterSources):
    def make(self, spec: BlobSpec, config: dict[str, Any]) -> RangeSource:
        if config.get("kind") == "gated":
            return GatedFileSource(spec, path=config["path"], gate=config["gate"],
                                   open_fetches=int(config.get("open_fetches", 0)))
        return super().make(spec, config)
