"""The plain copy of a blob that the fscache kernel worker keeps beside its cache file.

Why: a blob registered with a `copy_path` (the node daemon's blob file, which it hands to its local
layerstore once complete) needs its bytes as a readable file, and the cache file cannot be read back (the
anon fd only writes; while mounted the cache file is an unlinked tmpfile only the kernel holds). So every
verified range the worker writes into the cache is teed into the copy first, in the same writer thread, at
the same offset, into a sparse file of the blob's exact size (`BlobCopy.tee`, called by the worker's
cache write). Bytes the cache held before the copy was asked for (a cache kept from an earlier mount)
never pass through the worker again: once the cache file is whole, `Copies.complete_soon` fetches the
copy's remaining holes from the blob's source at prefetch priority, so a whole cache always ends in a whole
copy, and the supervisor is told (CopyComplete).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import errno
import logging
import os
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from afsd.errors import AfsdError
from afsd.ondemand.sparse import holes, open_sized, write_at
from afsd.ondemand.spec import FetchedRange, Priority

if TYPE_CHECKING:
    from afsd.ondemand.cachefiles.worker import ServedBlob

log = logging.getLogger("afsd.fscache.worker")

T = TypeVar("T")


def reason(error: BaseException) -> str:
    """What went wrong, without an OSError's file name (the caller names the file)."""
    return error.strerror if isinstance(error, OSError) and error.strerror else str(error)


@dataclass(eq=False)
class BlobCopy:
    """The plain file a blob's verified bytes are teed into (the registration's copy_path). Its fd is
    opened once, by the first writer thread that needs it; `users` (counted on the event loop) keeps it
    open while writer threads use it. Writes and closing take `lock`, so a write from a fill's thread
    that outlived its task (a source receiving and writing in one thread) finds a closed copy closed,
    never another file under the same fd number."""

    path: str
    size: int
    fd: int = -1
    users: int = 0
    retired: bool = False   # no longer the blob's copy (unregistered): fd goes when users reach 0
    complete: bool = False  # no hole left (as the last completion found)
    error: str = ""         # why the last write into it failed ("" once a fill succeeded)
    closed: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)

    # -- in writer threads --

    def write(self, data: bytes | memoryview, offset: int) -> None:
        with self.lock:
            write_at(self._fd(), memoryview(data)[:max(0, self.size - offset)], offset)

    def tee(self, data: bytes | memoryview, offset: int) -> None:
        """`write`, never raising: a copy that cannot be written must not fail the reader's READ."""
        try:
            self.write(data, offset)
        except OSError as e:
            if self.closed:   # retired meanwhile (unregistered): nothing to keep
                return
            if not self.error:
                log.warning("cannot write the copy %s (bytes %d-%d): %s; its holes are fetched again once "
                            "the cache file is whole", self.path, offset, offset + len(data), reason(e))
            self.error = f"{self.path}: {reason(e)}"

    def holes(self) -> list[tuple[int, int]]:
        with self.lock:
            return holes(self._fd(), 0, self.size)

    def _fd(self) -> int:
        """(Under `lock`.)"""
        if self.closed:
            raise OSError(errno.EBADF, "the copy was closed")
        if self.fd < 0:
            self.fd = open_sized(self.path, self.size)
        return self.fd

    # -- on the event loop --

    def close(self) -> None:
        with self.lock:
            self.closed = True
            if self.fd >= 0:
                os.close(self.fd)
                self.fd = -1


Fetch = Callable[["ServedBlob", int, int, Priority], Awaitable[FetchedRange]]


class Copies:
    """The worker's side of its blobs' copies: using one from a writer thread, completing one, retiring one.
    `fetch` reads a verified range of a blob from its source; `spawn` runs a coroutine as one of the
    worker's tracked tasks; `completed` is called once a blob's copy has no hole left."""

    def __init__(self, writer: concurrent.futures.Executor, fetch: Fetch,
                 spawn: Callable[[Any], asyncio.Task[None]], completed: Callable[[ServedBlob], None]) -> None:
        self.writer = writer
        self.fetch = fetch
        self.spawn = spawn
        self.completed = completed

    def hold(self, copy: BlobCopy | None) -> None:
        """A writer thread is about to use `copy`: keep its fd open until `release`."""
        if copy is not None:
            copy.users += 1

    def release(self, copy: BlobCopy | None, count: int = 1) -> None:
        if copy is None:
            return
        copy.users -= count
        if copy.retired and copy.users == 0:
            copy.close()

    async def in_writer(self, copy: BlobCopy, work: Callable[..., T], *args: Any) -> T:
        """Run `work(*args)` (a BlobCopy method) in a writer thread, keeping the copy's fd open meanwhile."""
        self.hold(copy)
        loop = asyncio.get_running_loop()
        future = self.writer.submit(work, *args)
        future.add_done_callback(lambda _: loop.call_soon_threadsafe(self.release, copy))
        return await asyncio.wrap_future(future)

    def complete_soon(self, blob: ServedBlob) -> None:
        """Once the cache file is whole, make sure the copy is too (in the background)."""
        if blob.complete and blob.copy is not None and blob.copier is None and blob.objects:
            blob.copier = self.spawn(self._complete(blob, blob.copy))

    async def _complete(self, blob: ServedBlob, copy: BlobCopy) -> None:
        """Fetch the copy's holes from the blob's source at PREFETCH priority. Usually there are none (every
        byte this worker writes into the cache went into the copy first); there are when the cache held
        bytes before the copy was asked for, or when a write into the copy failed."""
        try:
            missing = await self.in_writer(copy, copy.holes)
            if missing:
                log.info("blob %s is whole in the cache but its copy %s lacks %d bytes: fetching them", blob.name,
                         copy.path, sum(length for _, length in missing))
            for hole, length in missing:
                position = hole - hole % blob.unit
                while position < hole + length:
                    end = min(blob.spec.size, position + blob.unit)
                    fetched = await self.fetch(blob, position, end, Priority.PREFETCH)
                    fetched.require_covers(position, end)
                    await self.in_writer(copy, copy.write, fetched.data, fetched.offset)
                    position = end
            if missing:
                log.info("the copy %s of blob %s is complete", copy.path, blob.name)
            copy.error = ""
            if not copy.complete and not copy.retired:
                copy.complete = True
                self.completed(blob)
        except (OSError, AfsdError, ValueError) as e:
            copy.error = f"{copy.path}: {reason(e)}"
            if not copy.retired:
                log.warning("the copy %s of blob %s stays incomplete (tried again at the blob's next OPEN): %s",
                            copy.path, blob.name, reason(e))
        finally:
            if blob.copier is asyncio.current_task():
                blob.copier = None

    def stop(self, blob: ServedBlob) -> None:
        """Stop completing the blob's copy (its last object closed; resumed at its next OPEN)."""
        if blob.copier is not None:
            blob.copier.cancel()
            blob.copier = None

    def retire(self, blob: ServedBlob) -> None:
        """Stop writing the blob's copy (unregistered: the backend removes the file); close it once unused."""
        self.stop(blob)
        copy, blob.copy = blob.copy, None
        if copy is not None:
            copy.retired = True
            self.release(copy, 0)
