"""A mount's layers acquired and released at once (afsd/node/concurrently.py) and timed by phase
(afsd/phases.py): whatever happens, every layer acquired is released exactly once, and none that was not."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from afsd import phases
from afsd.node.concurrently import acquire_all, release_all


class Layers:
    def __init__(self) -> None:
        self.held: list[int] = []
        self.released: list[int] = []

    async def acquire(self, index: int, delay: float, fail: bool = False) -> int:
        await asyncio.sleep(delay)
        if fail:
            raise RuntimeError(f"layer {index} failed")
        self.held.append(index)
        return index * 10

    async def release(self, index: int) -> None:
        self.released.append(index)


async def test_results_come_in_order_and_are_released_last_first() -> None:
    layers = Layers()
    async with contextlib.AsyncExitStack() as undo:
        results = await acquire_all([layers.acquire(0, 0.03), layers.acquire(1, 0.0), layers.acquire(2, 0.01)],
                                    layers.release, undo)
        assert results == [0, 10, 20] and sorted(layers.held) == [0, 1, 2]
    assert layers.released == [2, 1, 0]


async def test_nothing_to_acquire_is_no_error() -> None:
    async with contextlib.AsyncExitStack() as undo:
        assert await acquire_all([], Layers().release, undo) == []


async def test_one_failure_releases_the_others_once_they_are_done() -> None:
    layers = Layers()
    with pytest.raises(RuntimeError, match="layer 1 failed"):
        async with contextlib.AsyncExitStack() as undo:
            await acquire_all([layers.acquire(0, 0.02), layers.acquire(1, 0.0, fail=True), layers.acquire(2, 0.04)],
                              layers.release, undo)
    assert sorted(layers.held) == [0, 2] and sorted(layers.released) == [0, 2]


async def test_a_cancelled_mount_releases_what_was_acquired() -> None:
    layers = Layers()

    async def mount() -> None:
        async with contextlib.AsyncExitStack() as undo:
            await acquire_all([layers.acquire(0, 0.0), layers.acquire(1, 10.0)], layers.release, undo)

    task = asyncio.ensure_future(mount())
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert layers.held == [0] and layers.released == [0]


async def test_phases_are_summed_over_the_tasks_a_recording_starts() -> None:
    async def step(name: str) -> None:
        with phases.phase(name):
            await asyncio.sleep(0.02)

    with phases.recording() as log:
        await asyncio.gather(step("attach"), step("attach"), step("erofs"))
    with phases.phase("outside"):   # no recording: nothing kept, nothing fails
        pass
    assert list(log.milliseconds) == ["attach", "erofs"] and log.milliseconds["attach"] >= 35
    assert log.summary().startswith("attach=") and " total=" in log.summary()


async def test_releases_run_together_and_one_failure_does_not_stop_the_others() -> None:
    first_started, released = asyncio.Event(), []

    async def release(index: int, fail: bool = False) -> None:
        if index == 0:
            first_started.set()
        else:
            await first_started.wait()   # ends only if release 0 started without waiting for this one
        if fail:
            raise RuntimeError(f"layer {index} failed")
        released.append(index)

    async def slow_release(index: int) -> None:
        await asyncio.sleep(0.02)
        await release(index)

    with pytest.raises(RuntimeError, match="layer 1 failed"):
        await asyncio.wait_for(release_all([slow_release(2), release(1, fail=True), release(0)]), 60)
    assert sorted(released) == [0, 2]    # the failure was raised once every other release had ended
    await release_all([])


async def test_a_cancelled_teardown_lets_the_releases_under_way_finish() -> None:
    released: list[int] = []

    async def release(index: int) -> None:
        await asyncio.sleep(0.05)
        released.append(index)

    task = asyncio.ensure_future(release_all([release(0), release(1)]))
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert sorted(released) == [0, 1]
