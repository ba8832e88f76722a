"""The node daemon's side of the fscache backend: start (or find) the supervisor, register blobs, ask
for status.

Data flow: node daemon -> `FscacheClient.register(spec, source config)` -> supervisor (keeps it) ->
`mount_fscache(name, target)` (mount.py, from the node daemon) -> the kernel's OPEN -> the worker looks
the registration up at the supervisor -> copen -> READs served from the source.

The supervisor is a detached daemon (its own session) that outlives the node daemon: a restarted node
daemon makes a new client on the same state directory and finds it still serving; `ensure_running`
starts one only when nothing answers, and reports why it could not (the supervisor binds the cache
before detaching, so its one-line error is the launcher's stderr).
"""

from __future__ import annotations

import asyncio
import fcntl
import os
from pathlib import Path
from typing import Any

from afsd.errors import AfsdError
from afsd.ondemand.cachefiles.paths import StatePaths
from afsd.ondemand.cachefiles.settings import Settings, supervisor_command
from afsd.ondemand.fanotify._wire import AsyncChannel
from afsd.ondemand.spec import BlobSpec


class FscacheBackendError(AfsdError):
    """The fscache supervisor could not be started, or refused a request."""


class FscacheClient:
    def __init__(self, state_dir: Path, *, cache_dir: Path | None = None, settings: Settings | None = None,
                 metrics_listen: str | None = None, start_timeout: float = 120.0) -> None:
        self.paths = StatePaths(Path(state_dir).absolute())
        self.cache_dir = Path(cache_dir).absolute() if cache_dir else self.paths.default_cache_dir
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
                *supervisor_command(self.paths.root, self.cache_dir, self.settings, metrics_listen=self.metrics_listen),
                stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
            try:
                _, stderr = await asyncio.wait_for(process.communicate(), self.start_timeout)
            except TimeoutError:
                process.kill()
                await process.wait()
                raise FscacheBackendError(f"the fscache supervisor for {self.paths.root} did not start within "
                                          f"{self.start_timeout:g} s: see {self.paths.log}") from None
            lines = [line for line in stderr.decode(errors="replace").splitlines() if line.strip()]
            if process.returncode != 0:
                reason = lines[-1].removeprefix("afsd fscache: ") if lines else f"see {self.paths.log}"
                raise FscacheBackendError(reason)
            deadline = asyncio.get_running_loop().time() + self.start_timeout
            while not await self._answers():
                if asyncio.get_running_loop().time() > deadline:
                    raise FscacheBackendError(f"the fscache supervisor for {self.paths.root} does not answer: "
                                              f"see {self.paths.log}")
                await asyncio.sleep(0.05)

    async def _answers(self) -> bool:
        try:
            channel = await AsyncChannel.connect(os.fspath(self.paths.socket), timeout=2.0)
        except (TimeoutError, OSError):
            return False
        channel.close()
        return True

    async def shutdown(self, *, force: bool = False, timeout: float = 60.0) -> None:
        """Stop the supervisor and its worker (refused while erofs mounts in fscache mode exist, unless
        `force`: their uncached reads would fail). Returns once both are gone and the cache is released."""
        if not await self._answers():
            return
        await self._request({"op": "shutdown", "force": force}, start=False)
        deadline = asyncio.get_running_loop().time() + timeout
        while not await asyncio.to_thread(self._stopped):
            if asyncio.get_running_loop().time() > deadline:
                raise FscacheBackendError(f"the fscache supervisor for {self.paths.root} did not stop within "
                                          f"{timeout:g} s")
            await asyncio.sleep(0.05)

    def _stopped(self) -> bool:
        try:
            fd = os.open(self.paths.lock, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            return True
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        finally:
            os.close(fd)
        return True

    async def restart_worker(self) -> None:
        """Replace the worker (an upgrade): requests in flight are re-delivered to the new one."""
        await self._request({"op": "restart-worker"}, start=False)

    # -- blobs -------------------------------------------------------------------------------------

    async def register(self, spec: BlobSpec, source_config: dict[str, Any], *, prefetch: bool = True) -> dict[str, Any]:
        """Serve `spec` (OPENs of cookie key `spec.name`) from `source_config` (see
        afsd.ondemand.fanotify.sources). Idempotent for the same blob; mount it afterwards."""
        reply = await self._request({"op": "register", "spec": spec.to_json(), "source": source_config,
                                     "prefetch": prefetch})
        return reply["blob"]

    async def unregister(self, name: str, *, force: bool = False) -> None:
        await self._request({"op": "unregister", "name": name, "force": force}, start=False)

    async def status(self) -> dict[str, Any]:
        return (await self._request({"op": "status"}, start=False))["status"]

    async def blob_status(self, name: str) -> dict[str, Any] | None:
        for blob in (await self.status())["blobs"]:
            if blob["name"] == name:
                return blob
        return None

    async def _request(self, message: dict[str, Any], *, start: bool = True) -> dict[str, Any]:
        path = os.fspath(self.paths.socket)
        try:
            channel = await AsyncChannel.connect(path)
        except (TimeoutError, OSError) as e:
            if not start:
                raise FscacheBackendError(f"cannot reach the fscache supervisor at {path}: {e}") from None
            await self.ensure_running()
            try:
                channel = await AsyncChannel.connect(path)
            except (TimeoutError, OSError) as e:
                raise FscacheBackendError(f"cannot reach the fscache supervisor at {path}: {e}") from None
        try:
            await channel.send({**message, "id": 1})
            item = await channel.receive()
        finally:
            channel.close()
        if item is None:
            raise FscacheBackendError(f"the fscache supervisor closed the connection during {message['op']}")
        reply = item[0]
        if not reply.get("ok"):
            raise FscacheBackendError(reply.get("error", f"{message['op']} failed"))
        return reply
