"""A RangeSource for the fscache worker tests (loaded by the worker through an "import" source config,
see afsd/ondemand/sources.py); no tests here.

`GatedFileSource` serves a complete local blob like the "file" source, but every fetch after the first
`open_fetches` (counted per worker process) waits until the file `gate` exists: a test can thus be sure a
READ is in flight inside the worker when it kills it. Kept free of heavy imports: the worker loads it.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from afsd.ondemand.sources import LocalFileSource
from afsd.ondemand.spec import BlobSpec, FetchedRange, Priority


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
