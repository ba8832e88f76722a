"""The fscache worker's READ fills (afsd/ondemand/cachefiles/readahead.py) on a real sparse file standing in
for a cache file (SEEK_HOLE answers the same): a READ of a unit being filled joins that fill, a sequential
reader gets the units after its own filled ahead, a random one gets nothing beyond its unit, and a READ
whose fill ahead failed fills its range itself. The kernel side is covered in the lab VM
(tests/vm/test_cachefiles_*.py, bench/fscache_bench.py)."""

from __future__ import annotations

import asyncio
import hashlib
import os
from pathlib import Path

import pytest

from afsd.ondemand.cachefiles.readahead import FIRST_WINDOW, SEQUENTIAL_AFTER, ReadFills
from afsd.ondemand.cachefiles.worker import OpenObject, ServedBlob
from afsd.ondemand.spec import BlobSpec, Priority

UNIT = 64 * 1024
UNITS = 64


class Harness:
    def __init__(self, path: Path, *, fail_ahead: bool = False) -> None:
        self.data = os.urandom(UNIT * UNITS)
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        os.ftruncate(self.fd, len(self.data))
        spec = BlobSpec(layer_digest="test:" + "ab" * 32, blob_digest="sha256:" + hashlib.sha256(self.data).hexdigest(),
                        size=len(self.data), chunk_size=UNIT, chunk_digests=(b"\0" * 32,) * UNITS, data_map=())
        self.blob = ServedBlob(spec.name, spec, {}, False, unit=UNIT)
        self.obj = OpenObject(1, self.fd, self.blob)
        self.fills: list[tuple[int, int, Priority]] = []
        self.fail_ahead = fail_ahead
        self.tasks: set[asyncio.Task[None]] = set()
        self.counters = {"reads_present": 0, "read_ahead_bytes": 0}
        self.reads = ReadFills(self.fill, self.release, self.tasks, self.counters, window=16, inflight=2)

    async def fill(self, obj: OpenObject, start: int, end: int, priority: Priority) -> int:
        self.fills.append((start // UNIT, -(-end // UNIT), priority))
        await asyncio.sleep(0.01)
        if self.fail_ahead and priority == Priority.AHEAD:
            raise OSError("the provider went away")
        return os.pwrite(obj.fd, self.data[start:end], start)

    def release(self, obj: OpenObject) -> None:
        obj.users -= 1

    async def read(self, unit: int) -> None:
        """A READ of one page at the start of `unit`, as the kernel sends them."""
        await self.reads.fill(self.obj, unit * UNIT, unit * UNIT + 4096)

    async def settle(self) -> None:
        while self.tasks:
            await asyncio.gather(*self.tasks, return_exceptions=True)

    def filled(self, unit: int) -> bool:
        return os.pread(self.fd, UNIT, unit * UNIT) == self.data[unit * UNIT:(unit + 1) * UNIT]


@pytest.fixture
def harness(tmp_path: Path):
    made: list[Harness] = []

    def make(**kw: bool) -> Harness:
        made.append(Harness(tmp_path / f"cache{len(made)}", **kw))
        return made[-1]

    yield make
    for h in made:
        os.close(h.fd)


def test_a_sequential_reader_gets_the_units_after_its_own_filled_before_it_asks(harness) -> None:
    h = harness()

    async def main() -> None:
        for unit in range(SEQUENTIAL_AFTER):
            await h.read(unit)
        await h.settle()
        ahead = [f for f in h.fills if f[2] == Priority.AHEAD]
        assert ahead and ahead[0][0] == SEQUENTIAL_AFTER   # right after the reader's last READ
        assert all(h.filled(u) for u in range(SEQUENTIAL_AFTER + 2 * FIRST_WINDOW))
        fills_before = len(h.fills)
        await h.read(SEQUENTIAL_AFTER)   # the kernel looked before the fill ahead landed: answered at once
        assert h.counters["reads_present"] == 1 and len(h.fills) == fills_before
        assert h.counters["read_ahead_bytes"] >= 2 * FIRST_WINDOW * UNIT

    asyncio.run(main())


def test_a_reader_that_read_past_the_units_filled_ahead_keeps_its_read_ahead(harness) -> None:
    """It raised no READ for the units filled ahead of it, so its next READ lands past them: still the same
    sequential reader (the full-size VM bench lost half its rate when such a READ started it over)."""
    h = harness()

    async def main() -> None:
        for unit in range(SEQUENTIAL_AFTER):
            await h.read(unit)
        await h.settle()
        caught_up = next(u for u in range(UNITS) if not h.filled(u))
        assert caught_up > SEQUENTIAL_AFTER + 1   # (the units it read without a READ)
        fills_before = len(h.fills)
        await h.read(caught_up)
        await h.settle()
        ahead = [f for f in h.fills[fills_before:] if f[2] == Priority.AHEAD]
        assert ahead and ahead[0][0] == caught_up + 1
        assert all(h.filled(u) for u in range(caught_up + 2 * FIRST_WINDOW))

    asyncio.run(main())


def test_a_random_reader_gets_only_its_own_units(harness) -> None:
    h = harness()

    async def main() -> None:
        for unit in (5, 40, 9, 27, 60, 2):
            await h.read(unit)
        await h.settle()
        assert [f[2] for f in h.fills] == [Priority.DEMAND] * 6
        assert sum(h.filled(u) for u in range(UNITS)) == 6

    asyncio.run(main())


def test_reads_of_a_unit_being_filled_join_that_fill(harness) -> None:
    h = harness()

    async def main() -> None:
        await asyncio.gather(*(h.read(7) for _ in range(5)))
        assert h.fills == [(7, 8, Priority.DEMAND)]
        assert h.filled(7)

    asyncio.run(main())


def test_a_read_whose_fill_ahead_failed_fills_its_range_itself(harness) -> None:
    h = harness(fail_ahead=True)

    async def main() -> None:
        for unit in range(SEQUENTIAL_AFTER):
            await h.read(unit)
        await h.read(SEQUENTIAL_AFTER)   # joins the failing fill ahead, then fills once more
        assert h.filled(SEQUENTIAL_AFTER)
        assert (SEQUENTIAL_AFTER, SEQUENTIAL_AFTER + 1, Priority.DEMAND) in h.fills
        await h.settle()

    asyncio.run(main())
