"""Acquire several things at once (the layers of a mount) without leaking any when one fails.

A mount attaches its layers concurrently: each layer's metadata prefill, registration and learned stream
start without waiting for the layers below it, so the stream of the last layer is not held back behind the
others' round trips. `acquire_all` runs the acquisitions together, lets every one end (a failed sibling does
not cancel the others halfway: a half-attached layer would be harder to undo than a whole one), pushes the
release of each that succeeded onto the caller's undo stack, and then raises the first failure.

An unmount releases them at once too (`release_all`): each layer's release takes its recording and
unregisters it from its backend, round trips that need not wait for each other's. Every release runs to its
end whatever the others do, so one failure does not leave the rest attached.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

T = TypeVar("T")

log = logging.getLogger(__name__)


async def acquire_all(acquisitions: Sequence[Awaitable[T]], release: Callable[[int], Awaitable[None]],
                      undo: contextlib.AsyncExitStack) -> list[T]:
    """The results of `acquisitions`, in order; `release(i)` is pushed onto `undo` for every i that succeeded
    (in order, so they are released last-acquired first, as a sequential loop would)."""
    tasks = [asyncio.ensure_future(acquisition) for acquisition in acquisitions]
    if not tasks:   # an image without layers (asyncio.wait refuses an empty set)
        return []
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


async def release_all(releases: Sequence[Awaitable[None]], what: str = "release") -> None:
    """Run `releases` together until every one has ended; then raise the first failure (the others are
    logged). Cancelled meanwhile, the releases still run to their end before the cancellation goes on: a
    layer half released would be neither in use nor free."""
    tasks = [asyncio.ensure_future(release) for release in releases]
    if not tasks:
        return
    try:
        await asyncio.shield(asyncio.wait(tasks))
    except asyncio.CancelledError:
        await asyncio.wait(tasks)
        raise
    failures = [task.exception() for task in tasks if task.exception() is not None]
    for failure in failures[1:]:
        log.warning("%s failed as well: %s", what, failure)
    if failures:
        raise failures[0]   # type: ignore[misc]
