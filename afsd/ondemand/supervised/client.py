"""The node daemon's side of a supervised backend: start (or find) the detached supervisor of a state
directory, send it requests, wait for it to stop. Written once for both backends; each subclass says how
its supervisor is started and adds its own requests (fanotify/client.py, cachefiles/client.py).

The supervisor outlives the node daemon: a restarted node daemon makes a new client on the same state
directory and finds it still serving; `ensure_running` starts one only when nothing answers. One request
is one connection to DIR/supervisor.sock carrying one request and its Reply (protocol.py); a Watch keeps
its connection and receives a BlobComplete per blob that became complete.

Only a Register starts a supervisor that is not running. Other requests never do: a status poll or a
detach that did would bring back a supervisor just shut down (with the kernel device it holds and nobody
left to stop it). They wait for one being restarted (its keeper alive) and find a stopped one stopped.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from typing import ClassVar

from afsd.errors import AfsdError
from afsd.ondemand._wire import AsyncChannel, ProtocolError
from afsd.ondemand.supervised import protocol as p
from afsd.ondemand.supervised.paths import SupervisorPaths
from afsd.ondemand.trace import RecordedTrace


class SupervisorClientBase(ABC):
    error: ClassVar[type[AfsdError]]                   # what every failure here raises
    # Requests that get through when no supervisor answers: these start one...
    launching_requests: ClassVar[tuple[type[p.Message], ...]] = (p.Register,)
    # ...and these (a backend's choice, launching ones included) wait for one being restarted.
    waiting_requests: ClassVar[tuple[type[p.Message], ...]] = (p.Register,)

    def __init__(self, paths: SupervisorPaths, *, start_timeout: float) -> None:
        self.paths = paths
        self.start_timeout = start_timeout
        self._starting = asyncio.Lock()

    @property
    def _name(self) -> str:
        return f"the {self.paths.backend} supervisor"

    @abstractmethod
    def _command(self) -> list[str]:
        """The command that starts the supervisor detached: it exits 0 once the daemon serves."""

    def _start_failure(self, stderr: str) -> str:
        """The error line when the launcher exited non-zero (`stderr`: what it wrote)."""
        return f"{self._name} for {self.paths.root} did not start: see {self.paths.supervisor_log}"

    # -- lifecycle ---------------------------------------------------------------------------------

    async def ensure_running(self) -> None:
        """Make sure a supervisor serves this state directory, starting one (detached) if needed."""
        async with self._starting:
            if await self._answers():
                return
            await asyncio.to_thread(self.paths.ensure)
            process = await asyncio.create_subprocess_exec(
                *self._command(), stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.PIPE)
            try:
                _, stderr = await asyncio.wait_for(process.communicate(), self.start_timeout)
            except TimeoutError:
                process.kill()
                await process.wait()
                raise self.error(f"{self._name} for {self.paths.root} did not start within {self.start_timeout:g} s: "
                                 f"see {self.paths.supervisor_log}") from None
            if process.returncode != 0:
                raise self.error(self._start_failure(stderr.decode(errors="replace")))
            deadline = asyncio.get_running_loop().time() + self.start_timeout
            while not await self._answers():   # e.g. one the fanotify keeper restarted may still be starting
                if asyncio.get_running_loop().time() > deadline:
                    raise self.error(f"{self._name} for {self.paths.root} does not answer: "
                                     f"see {self.paths.supervisor_log}")
                await asyncio.sleep(0.05)

    async def _answers(self) -> bool:
        try:
            channel = await AsyncChannel.connect(os.fspath(self.paths.supervisor_socket), timeout=2.0)
        except (TimeoutError, OSError):
            return False
        channel.close()
        return True

    async def shutdown(self, *, force: bool = False, timeout: float = 60.0) -> None:
        """Stop the supervisor and every process it runs (refused while mounts still need it, unless
        `force`). Returns once all of them are gone."""
        if not await self._answers():
            return
        await self._request(p.Shutdown(force=force))
        deadline = asyncio.get_running_loop().time() + timeout
        while not await asyncio.to_thread(self._stopped):
            if asyncio.get_running_loop().time() > deadline:
                raise self.error(f"{self._name} for {self.paths.root} did not stop within {timeout:g} s")
            await asyncio.sleep(0.05)

    async def _restarted(self) -> bool:
        """Wait for a supervisor that is being restarted to answer; False at once when every daemon of this
        backend is stopped."""
        deadline = asyncio.get_running_loop().time() + self.start_timeout
        while not await self._answers():
            if await asyncio.to_thread(self._stopped):
                return False
            if asyncio.get_running_loop().time() > deadline:
                raise self.error(f"{self._name} for {self.paths.root} does not answer: "
                                 f"see {self.paths.supervisor_log}")
            await asyncio.sleep(0.05)
        return True

    def _stopped(self) -> bool:
        for lock in self.paths.daemon_locks():
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

    # -- requests ----------------------------------------------------------------------------------

    async def unregister(self, name: str, *, force: bool = False, missing_ok: bool = False) -> None:
        """Stop serving blob `name` (refused while it is still mounted and needs the supervisor, unless
        `force`). With `missing_ok`, a blob the supervisor does not know is not an error."""
        try:
            reply = await self._request_running(p.Unregister(name=name, force=force))
        except AfsdError as e:
            if not (missing_ok and "is not registered" in str(e)):
                raise
            return
        if reply is None and not missing_ok:   # (a stopped supervisor serves no blob)
            raise self._stopped_error()

    async def status_if_running(self) -> p.SupervisorStatus | None:
        """The supervisor's status; None when it is stopped (asking never starts it)."""
        reply = await self._request_running(p.StatusRequest())
        if reply is None:
            return None
        if reply.status is None:
            raise self.error(f"{self._name} answered a status request without a status")
        return reply.status

    async def status(self) -> p.SupervisorStatus:
        """The supervisor's status; `error` saying it is stopped when it is."""
        status = await self.status_if_running()
        if status is None:
            raise self._stopped_error()
        return status

    async def blob_status(self, name: str) -> p.BlobStatus | None:
        """Blob `name`'s status; None when the supervisor does not serve it (or is stopped)."""
        status = await self.status_if_running()
        return status.blob(name) if status is not None else None

    async def trace(self, name: str, *, close: bool = False, detaching: bool = False) -> RecordedTrace | None:
        """The recording of blob `name`'s first reads (None: it records none); `close` ends its window now;
        `detaching`: the blob is detached next (p.TraceRequest)."""
        return (await self._request(p.TraceRequest(name=name, close=close, detaching=detaching))).trace

    async def watch(self) -> AsyncIterator[p.BlobComplete]:
        """A BlobComplete for every blob that becomes complete (and whose plain file, if it has one, is
        whole) from now on. Ends when the supervisor goes away; raises `error` when none is running.
        Watching never starts a supervisor: a watcher that did would bring back one just shut down (the
        node daemon watches for as long as it runs), which then holds the kernel device (fscache: the one
        /dev/cachefiles of the machine) with nobody left to stop it."""
        path = os.fspath(self.paths.supervisor_socket)
        try:
            channel = await AsyncChannel.connect(path)
        except (TimeoutError, OSError) as e:
            raise self.error(f"{self._name} is not running (nothing answers at {path}: {e})") from None
        try:
            await channel.send(p.Watch(id=1).to_json())
            while (item := await channel.receive()) is not None:
                try:
                    message = p.parse(item[0])
                except ProtocolError as e:
                    raise self.error(f"{self._name} sent a malformed message: {e}") from None
                if isinstance(message, p.Reply) and not message.ok:
                    raise self.error(message.error or "watch failed")
                if isinstance(message, p.BlobComplete):
                    yield message
        finally:
            channel.close()

    def _stopped_error(self) -> AfsdError:
        return self.error(f"{self._name} for {self.paths.root} is stopped")

    async def _request(self, message: p.Message) -> p.Reply:
        reply = await self._request_running(message)
        if reply is None:
            raise self._stopped_error()
        return reply

    async def _request_running(self, message: p.Message) -> p.Reply | None:
        """`message`'s Reply; None when the supervisor is stopped and `message` does not launch one."""
        path = os.fspath(self.paths.supervisor_socket)
        try:
            channel = await AsyncChannel.connect(path)
        except (TimeoutError, OSError) as e:
            if not isinstance(message, self.waiting_requests):
                raise self.error(f"cannot reach {self._name} at {path}: {e}") from None
            if isinstance(message, self.launching_requests):
                await self.ensure_running()   # not running (or, for fanotify, being restarted by its keeper)
            elif not await self._restarted():
                return None
            try:
                channel = await AsyncChannel.connect(path)
            except (TimeoutError, OSError) as e:
                raise self.error(f"cannot reach {self._name} at {path}: {e}") from None
        try:
            await channel.send(message.to_json() | {"id": 1})
            item = await channel.receive()
        finally:
            channel.close()
        try:
            return self._check(message.op, item[0] if item is not None else None)
        except ProtocolError as e:
            raise self.error(f"{self._name} sent a malformed reply to {message.op}: {e}") from None

    def _check(self, op: str, frame: dict | None) -> p.Reply:
        if frame is None:
            raise self.error(f"{self._name} closed the connection during {op}")
        reply = p.parse_as(frame, p.Reply)
        if not reply.ok:
            raise self.error(reply.error or f"{op} failed")
        return reply
