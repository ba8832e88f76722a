"""RangeSources with faults, for the fanotify backend's crash tests. `FaultSources` is the source factory
the test supervisors inject into their fetch workers (`SETTINGS`; afsd/ondemand/sources.py says how), and
`config(name, **args)` writes a blob's source configuration {"kind": name, **args}; "file" works too.

- `slow`: a LocalFileSource that drops a marker file when a fetch starts (so a test knows a reader is
  waiting on it) and answers `delay` seconds later: a wide window to kill a worker in.
- `hanging`: connects to a TCP listener that accepts and never sends a byte, and waits for the answer
  (a provider that accepted the connection and then hung).
- `failing`: every fetch fails.
- `slow-close`: every fetch fails; closing it takes `delay` seconds, then drops the file `marker` (so a
  test can tell whether a worker waited for its sources to close).
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Any

from afsd.errors import FetchError
from afsd.ondemand.sources import FileSources, LocalFileSource
from afsd.ondemand.spec import BlobSink, BlobSpec, FetchedRange, Filled, Priority, RangeSource

_REPO_ROOT = str(Path(__file__).resolve().parents[2])

# What a test supervisor's settings say, so that its workers load FaultSources.
SETTINGS = {"sources": "tests.support.fanotify_sources:FaultSources", "sources_path": _REPO_ROOT}


def config(name: str, **args: Any) -> dict[str, Any]:
    return {"kind": name, **args}


class SlowSource(LocalFileSource):
    def __init__(self, spec: BlobSpec, path: Path, delay: float, markers: Path | None) -> None:
        super().__init__(spec, path)
        self.delay = delay
        self.markers = markers

    async def fetch(self, offset: int, length: int, priority: Priority = Priority.DEMAND) -> FetchedRange:
        await self._wait(offset, length)
        return await super().fetch(offset, length, priority)

    async def fill(self, offset: int, length: int, priority: Priority, sink: BlobSink) -> Filled:
        await self._wait(offset, length)
        return await super().fill(offset, length, priority, sink)

    async def _wait(self, offset: int, length: int) -> None:
        if self.markers is not None:
            marker = self.markers / f"{time.monotonic_ns()}-{os.getpid()}-{offset}-{length}"
            await asyncio.to_thread(marker.touch)
        await asyncio.sleep(self.delay)


class HangingSource:
    def __init__(self, spec: BlobSpec, host: str, port: int) -> None:
        self.spec = spec
        self.host, self.port = host, port
        self._writers: list[asyncio.StreamWriter] = []

    async def fetch(self, offset: int, length: int, priority: Priority = Priority.DEMAND) -> FetchedRange:
        reader, writer = await asyncio.open_connection(self.host, self.port)
        self._writers.append(writer)
        writer.write(f"READ {self.spec.name} {offset} {length}\n".encode())
        await writer.drain()
        data = await reader.read(1)   # the listener never sends anything
        raise FetchError(f"provider {self.host}:{self.port} closed the connection ({data!r})")

    async def close(self) -> None:
        for writer in self._writers:
            writer.close()


class FailingSource:
    def __init__(self, spec: BlobSpec, reason: str) -> None:
        self.reason = reason

    async def fetch(self, offset: int, length: int, priority: Priority = Priority.DEMAND) -> FetchedRange:
        raise FetchError(self.reason)

    async def close(self) -> None:
        pass


class SlowCloseSource(FailingSource):
    def __init__(self, spec: BlobSpec, delay: float, marker: Path) -> None:
        super().__init__(spec, "this source only closes (injected)")
        self.delay, self.marker = delay, marker

    async def close(self) -> None:
        await asyncio.sleep(self.delay)
        await asyncio.to_thread(self.marker.touch)


class FaultSources(FileSources):
    """The test kinds: "slow", "hanging", "failing", "slow-close" (plus "file")."""

    def make(self, spec: BlobSpec, config: dict[str, Any]) -> RangeSource:
        kind = config.get("kind")
        if kind == "slow":
            markers = config.get("markers")
            return SlowSource(spec, Path(config["path"]), float(config["delay"]), Path(markers) if markers else None)
        if kind == "hanging":
            return HangingSource(spec, config["host"], int(config["port"]))
        if kind == "failing":
            return FailingSource(spec, config.get("reason", "every provider failed (injected)"))
        if kind == "slow-close":
            return SlowCloseSource(spec, float(config["delay"]), Path(config["marker"]))
        return super().make(spec, config)
