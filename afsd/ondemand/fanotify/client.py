"""The node daemon's side of the fanotify backend: start or re-attach the supervisor, prepare blobs,
register them.

Data flow: node daemon -> `prepare_blob` (sparse file, metadata prefilled from a RangeSource) ->
`SupervisorClient.register` (the supervisor opens the fill fd, marks the blob, serves its misses)
-> `afsd.erofs.mount.mount_erofs(blob_path, target)` -> readers.

The supervisor is a detached daemon (its own session) that outlives the node daemon: a restarted node
daemon makes a new `SupervisorClient` on the same state directory and finds it (or the replacement the
keeper started) still serving; `ensure_running` starts one only when nothing answers.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from afsd.errors import AfsdError
from afsd.ondemand.fanotify import _sys
from afsd.ondemand.fanotify._wire import AsyncChannel
from afsd.ondemand.fanotify.paths import StatePaths
from afsd.ondemand.fanotify.settings import Settings, command_line
from afsd.ondemand.spec import BlobSpec, Priority, RangeSource

PREFILL_REQUEST = 8 << 20


class FanotifyBackendError(AfsdError):
    """The fanotify supervisor refused a request or cannot be reached."""


class SupervisorClient:
    def __init__(self, state_dir: Path, settings: Settings | None = None, *, metrics_listen: str | None = None,
                 start_timeout: float = 30.0) -> None:
        self.paths = StatePaths(Path(state_dir).absolute())
        self.settings = settings or Settings()
        self.metrics_listen = metrics_listen
        self.start_timeout = start_timeout
        self._starting = asyncio.Lock()

    # -- lifecycle ---------------------------------------------------------------------------------

    async def ensure_running(self) -> None:
        """Make sure a supervisor serves this state directory, starting one (detached) if needed."""
        async with self._starting:
            if await self._answers():
                return
            await asyncio.to_thread(self.paths.ensure)
            process = await asyncio.create_subprocess_exec(
                *command_line(self.paths.root, self.settings, metrics_listen=self.metrics_listen, daemon=True),
                stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.DEVNULL)
            try:
                status = await asyncio.wait_for(process.wait(), self.start_timeout)
            except TimeoutError:
                process.kill()
                await process.wait()
                status = -1
            if status != 0:
                raise FanotifyBackendError(f"the fanotify supervisor for {self.paths.root} did not start: "
                                           f"see {self.paths.supervisor_log}")
            deadline = asyncio.get_running_loop().time() + self.start_timeout
            while not await self._answers():  # a supervisor the keeper restarted may still be starting
                if asyncio.get_running_loop().time() > deadline:
                    raise FanotifyBackendError(f"the fanotify supervisor for {self.paths.root} does not answer: "
                                               f"see {self.paths.supervisor_log}")
                await asyncio.sleep(0.05)

    async def _answers(self) -> bool:
        try:
            channel = await AsyncChannel.connect(os.fspath(self.paths.supervisor_socket), timeout=2.0)
        except (TimeoutError, OSError):
            return False
        channel.close()
        return True

    async def shutdown(self, *, force: bool = False, timeout: float = 30.0) -> None:
        """Stop the supervisor, its workers and its keeper (refused while incomplete blobs are mounted,
        unless `force`). Returns once all of them are gone."""
        if not await self._answers():
            return
        await self._request({"op": "shutdown", "force": force}, start=False)
        deadline = asyncio.get_running_loop().time() + timeout
        while not await asyncio.to_thread(self._stopped):
            if asyncio.get_running_loop().time() > deadline:
                raise FanotifyBackendError(f"the fanotify supervisor for {self.paths.root} did not stop within "
                                           f"{timeout:g} s")
            await asyncio.sleep(0.05)

    def _stopped(self) -> bool:
        for lock in (self.paths.supervisor_lock, self.paths.keeper_lock):
            try:
                fd = os.open(lock, os.O_RDWR | os.O_CLOEXEC)
            except FileNotFoundError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False
            finally:
                os.close(fd)
        return True

    async def restart(self) -> None:
        """Ask the supervisor to exit so the keeper starts a fresh one (e.g. after an upgrade)."""
        await self._request({"op": "restart"}, start=False)

    # -- requests ----------------------------------------------------------------------------------

    async def register(self, spec: BlobSpec, blob_path: Path, source_config: dict[str, Any], *,
                       prefetch: bool = False) -> dict[str, Any]:
        """Have the supervisor serve `blob_path` (prepared with `prepare_blob`). Returns the blob's status
        (state "complete" when nothing is missing). Idempotent for the same blob and path."""
        reply = await self._request({"op": "register", "path": os.fspath(Path(blob_path).absolute()),
                                     "spec": spec.to_json(), "source": source_config, "prefetch": prefetch})
        return reply["blob"]

    async def unregister(self, name: str, *, force: bool = False) -> None:
        await self._request({"op": "unregister", "name": name, "force": force})

    async def status(self) -> dict[str, Any]:
        return (await self._request({"op": "status"}))["status"]

    async def blob_status(self, name: str) -> dict[str, Any] | None:
        for blob in (await self.status())["blobs"]:
            if blob["name"] == name:
                return blob
        return None

    async def watch(self) -> AsyncIterator[dict[str, Any]]:
        """Events as they happen: {"event": "complete", "name", "path"} when a blob has no hole left
        (its mark is gone; hand it to the layerstore). Ends when the supervisor goes away."""
        await self.ensure_running()
        channel = await AsyncChannel.connect(os.fspath(self.paths.supervisor_socket))
        try:
            await channel.send({"op": "watch", "id": 1})
            while (item := await channel.receive()) is not None:
                message, _ = item
                if message.get("op") == "event":
                    yield message
        finally:
            channel.close()

    async def _request(self, message: dict[str, Any], *, start: bool = True) -> dict[str, Any]:
        if start:
            await self.ensure_running()
        try:
            channel = await AsyncChannel.connect(os.fspath(self.paths.supervisor_socket))
        except (TimeoutError, OSError) as e:
            raise FanotifyBackendError(f"cannot reach the fanotify supervisor at {self.paths.supervisor_socket}: "
                                       f"{e}") from None
        try:
            await channel.send({**message, "id": 1})
            item = await channel.receive()
        finally:
            channel.close()
        if item is None:
            raise FanotifyBackendError(f"the fanotify supervisor closed the connection during {message['op']}")
        reply = item[0]
        if not reply.get("ok"):
            raise FanotifyBackendError(reply.get("error", f"{message['op']} failed"))
        return reply


async def prepare_blob(spec: BlobSpec, blob_path: Path, source: RangeSource, *,
                       whole_chunks: bool = False) -> bool:
    """Create `blob_path` as a sparse file of the blob's size with every metadata byte present (fetched
    through `source`, verified), so erofs can mount it and only file data is left to fill on demand.
    With `whole_chunks`, the fetched chunks are written whole (more bytes present, fewer events later).

    A file already there with the right size and its metadata present is kept (it may be partly filled
    from an earlier run). Returns True when it created the file.
    """
    if await asyncio.to_thread(_prepared, spec, blob_path):
        return False
    partial = blob_path.with_name(f".{blob_path.name}.{os.getpid()}.partial")
    fd = await asyncio.to_thread(_create_sparse, partial, spec.size)
    try:
        for start, length in _metadata_requests(spec):
            fetched = await source.fetch(start, length, Priority.DEMAND)
            ranges = ([(fetched.offset, len(fetched.data))] if whole_chunks
                      else _clip(spec.metadata_ranges(), fetched.offset, fetched.offset + len(fetched.data)))
            await asyncio.to_thread(_write_ranges, fd, fetched.offset, fetched.data, ranges)
        await asyncio.to_thread(os.fsync, fd)
        await asyncio.to_thread(os.replace, partial, blob_path)
    except BaseException:
        await asyncio.to_thread(partial.unlink, missing_ok=True)
        raise
    finally:
        await asyncio.to_thread(os.close, fd)
    return True


def _prepared(spec: BlobSpec, path: Path) -> bool:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        if os.fstat(fd).st_size != spec.size:
            return False
        return all(_sys.first_hole(fd, offset, offset + length) is None for offset, length in spec.metadata_ranges())
    finally:
        os.close(fd)


def _create_sparse(path: Path, size: int) -> int:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        _, fs_name = _sys.filesystem_type(fd)
        if fs_name not in _sys.MARKABLE_FILESYSTEMS.values():
            raise FanotifyBackendError(f"{path.parent} is on {fs_name}, where fanotify pre-content marks are "
                                       "refused: keep the layer cache on ext4, xfs or btrfs")
        os.ftruncate(fd, size)
    except BaseException:
        os.close(fd)
        path.unlink(missing_ok=True)
        raise
    return fd


def _metadata_requests(spec: BlobSpec) -> list[tuple[int, int]]:
    """Whole-chunk requests covering every metadata range, merged, each at most PREFILL_REQUEST bytes."""
    size = spec.chunk_size
    chunks = sorted({c for offset, length in spec.metadata_ranges() if length > 0
                     for c in range(offset // size, (offset + length - 1) // size + 1)})
    requests: list[tuple[int, int]] = []
    for chunk in chunks:
        start = chunk * size
        end = min(spec.size, start + size)
        if requests and requests[-1][0] + requests[-1][1] == start and requests[-1][1] < PREFILL_REQUEST:
            requests[-1] = (requests[-1][0], end - requests[-1][0])
        else:
            requests.append((start, end - start))
    return requests


def _clip(ranges: list[tuple[int, int]], start: int, end: int) -> list[tuple[int, int]]:
    out = []
    for offset, length in ranges:
        low, high = max(offset, start), min(offset + length, end)
        if low < high:
            out.append((low, high - low))
    return out


def _write_ranges(fd: int, base: int, data: bytes, ranges: list[tuple[int, int]]) -> None:
    view = memoryview(data)
    for offset, length in ranges:
        piece = view[offset - base:offset - base + length]
        position = offset
        while piece:
            count = os.pwrite(fd, piece, position)
            piece, position = piece[count:], position + count
