"""The node daemon's side of the fanotify backend: start or re-attach the supervisor, prepare blobs,
register them.

Data flow: node daemon -> `prepare_blob` (blobfile.py: sparse file, metadata prefilled) ->
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
from afsd.ondemand.fanotify._wire import AsyncChannel
from afsd.ondemand.fanotify.blobfile import BlobFileError, prepare_blob
from afsd.ondemand.fanotify.paths import StatePaths
from afsd.ondemand.fanotify.settings import Settings, command_line
from afsd.ondemand.spec import BlobSpec

__all__ = ["BlobFileError", "FanotifyBackendError", "SupervisorClient", "prepare_blob"]


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
        path = os.fspath(self.paths.supervisor_socket)
        try:
            channel = await AsyncChannel.connect(path)
        except (TimeoutError, OSError) as e:
            if not start:
                raise FanotifyBackendError(f"cannot reach the fanotify supervisor at {path}: {e}") from None
            await self.ensure_running()   # not running (or being restarted by its keeper)
            try:
                channel = await AsyncChannel.connect(path)
            except (TimeoutError, OSError) as e:
                raise FanotifyBackendError(f"cannot reach the fanotify supervisor at {path}: {e}") from None
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
