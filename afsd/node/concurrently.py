"""Acquire several things at once (the layers of a mount) without leaking any when one fails.

A mount attaches its layers concurrently: each layer's metadata prefill, registration and learned stream
start without waiting for the layers below it, so the stream of the last layer is not held back behind the
others' round trips. `acquire_all` runs the acquisitions together, lets every one end (a failed sibling does
not cancel the others halfway: a half-attached layer would be harder to undo than a whole one), pushes the
release of each that succeeded onto the caller's undo stack, and then raises the first failure.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

T = TypeVar("T")


async def acquire_all(acquisitions: Sequence[Awaitable[T]], release: Callable[[int], Awaitable[None]],
                      undo: contextlib.AsyncExitStack) -> list[T]:
    """The results of `acquisitions`, in order; `release(i)` is pushed onto `undo` for every i that succeeded
    (in order, so they are released last-acquired first, as a sequential loop would)."""
    tasks = [asyncio.ensure_future(acquisition) for acquisition in acquisitions]
    try:
        await asyncio.wait(tasks)
    except BaseException:   # we are cancelled: stop the acquisitions, then release whatever they got
        for task in tasks:
            task.cancel()
        await asyncio.wait(tasks)
        _push_releases(tasks, release, undo)
        raise
    _push_releases(tasks, release, undo)
    for task in tasks:
        if task.exception() is not None:
            raise task.exception()   # type: ignore[misc]
    return [task.result() for task in tasks]


def _push_releases(tasks: list[asyncio.Future[T]], release: Callable[[int], Awaitable[None]],
                   undo: contextlib.AsyncExitStack) -> None:
    for index, task in enumerate(tasks):
        if task.done() and not task.cancelled() and task.exception() is None:
            undo.push_async_callback(release, index)
