"""One container's life: `runc run --detach`, its output, its exit, and its removal.

`runc run --detach` starts the container and exits; the container's init is then re-parented to
afslet (a child subreaper), which waits for it directly. This gives the command's real wait status,
keeps the cgroup (and its OOM counter and CPU time) until afslet has read it, and splits start from run.
runc passes its stdout/stderr pipes through to the container, so what arrives on stderr before runc
has exited is runc's own complaint if the start fails, and the container's otherwise: it is held back
until runc's exit says which.

`destroy` is idempotent and is what every path ends with (success, failure, timeout, cancellation):
kill runc's process group if it still runs, `runc kill KILL`, wait for the init, `runc delete
--force`, and kill and remove whatever is left in the cgroup.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from afsd.afslet import cgroups
from afsd.afslet.errors import SetupError
from afsd.afslet.outcome import EXIT_CANNOT_EXECUTE, EXIT_NOT_FOUND, EXIT_SETUP_FAILED
from afsd.afslet.output import LineSink, open_pipe_reader, pump_lines
from afsd.afslet.runc import Runc, kill_group, runc_error

log = logging.getLogger(__name__)

START_TIMEOUT = 60.0
KILL_WAIT = 10.0
OUTPUT_DRAIN = 5.0


@dataclass
class ContainerExit:
    wait_status: int
    timed_out: bool
    usage: cgroups.CgroupUsage
    start_seconds: float  # from `runc run` to the container running
    run_seconds: float    # from then to its exit


def start_failure_status(message: str) -> int:
    """Docker's codes for a command that cannot run: 127 not found, 126 not executable, else 125."""
    text = message.lower()
    if "exec" in text and ("executable file not found" in text or "no such file or directory" in text):
        return EXIT_NOT_FOUND
    if "exec" in text and "permission denied" in text:
        return EXIT_CANNOT_EXECUTE
    return EXIT_SETUP_FAILED


@dataclass
class Container:
    runc: Runc
    container_id: str
    bundle: Path
    cgroup_path: str
    _runc_pid: int | None = None
    _init_exit: asyncio.Future[int] | None = None
    _started: bool = False
    _pumps: list[asyncio.Task[int]] = field(default_factory=list)
    _removal: asyncio.Future[list[str]] | None = None

    @property
    def started(self) -> bool:
        return self._started

    async def run(self, timeout_s: float, stdout: LineSink, stderr: LineSink) -> ContainerExit:
        """Start the container and wait for it to exit (killing it at `timeout_s` after the start)."""
        loop = asyncio.get_running_loop()
        log_file = self.bundle / "runc.log"
        pid_file = self.bundle / "init.pid"
        held_stderr: list[str] | None = []

        async def stderr_gate(line: str) -> None:
            if held_stderr is not None:
                held_stderr.append(line)
            else:
                await stderr(line)

        out_read, out_write = os.pipe()
        err_read, err_write = os.pipe()
        try:
            out_reader = await open_pipe_reader(out_read)
            err_reader = await open_pipe_reader(err_read)
        except BaseException:
            for fd in (out_read, err_read, out_write, err_write):
                with contextlib.suppress(OSError):
                    os.close(fd)
            raise
        self._pumps = [asyncio.create_task(pump_lines(out_reader, stdout)),
                       asyncio.create_task(pump_lines(err_reader, stderr_gate))]
        reaper = self.runc.reaper
        spawned_at = loop.time()
        try:
            with reaper.holding():
                try:
                    process = await reaper.spawn(
                        *self.runc.argv("run", "--detach", "--pid-file", str(pid_file), "--bundle", str(self.bundle),
                                        self.container_id, log_file=log_file),
                        stdin=asyncio.subprocess.DEVNULL, stdout=out_write, stderr=err_write, start_new_session=True)
                finally:
                    os.close(out_write)
                    os.close(err_write)
                self._runc_pid = process.pid
                try:
                    returncode = await asyncio.wait_for(process.wait(), START_TIMEOUT)
                except TimeoutError:
                    raise SetupError(f"runc did not start container {self.container_id} within "
                                     f"{START_TIMEOUT:.0f}s") from None
                if returncode == 0:
                    init_pid = int((await asyncio.to_thread(pid_file.read_text)).strip())
                    self._init_exit = reaper.claim(init_pid)
                    self._started = True
            if not self._started:
                await self._drain(OUTPUT_DRAIN)
                message = await asyncio.to_thread(runc_error, log_file, "\n".join(held_stderr or []))
                raise SetupError(f"runc could not start the command: {message}", start_failure_status(message))
        finally:
            self._runc_pid = None
        started_at = loop.time()
        while held_stderr:  # the container's: pass it on in order, then let the rest through directly
            await stderr(held_stderr.pop(0))
        held_stderr = None

        assert self._init_exit is not None
        timed_out = False
        try:
            status = await asyncio.wait_for(asyncio.shield(self._init_exit), timeout_s)
        except TimeoutError:
            timed_out = True
            status = await self._kill_and_wait()
        exited_at = loop.time()
        usage = await asyncio.to_thread(cgroups.usage, self.cgroup_path)
        await self._drain(OUTPUT_DRAIN)
        return ContainerExit(status, timed_out, usage, started_at - spawned_at, exited_at - started_at)

    async def _kill_and_wait(self) -> int:
        assert self._init_exit is not None
        await self.runc.kill(self.container_id)
        try:
            return await asyncio.wait_for(asyncio.shield(self._init_exit), KILL_WAIT)
        except TimeoutError:
            # runc could not kill it: kill everything in its cgroup directly.
            log.warning("container %s survived runc kill; killing its cgroup", self.container_id)
            await asyncio.to_thread(cgroups.remove, self.cgroup_path)
            return await asyncio.wait_for(asyncio.shield(self._init_exit), KILL_WAIT)

    async def _drain(self, timeout: float) -> None:
        """Let the output pumps reach EOF (every writer gone), then stop them."""
        if self._pumps:
            await asyncio.wait(self._pumps, timeout=timeout)
        for pump in self._pumps:
            pump.cancel()
        for pump in self._pumps:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await pump
        self._pumps = []

    async def destroy(self) -> list[str]:
        """Kill and remove the container, whatever state it is in; return cgroup dirs that survived.

        Safe to call from several places at once: they all wait for the one removal.
        """
        if self._removal is None:
            self._removal = asyncio.ensure_future(self._destroy())
        return await asyncio.shield(self._removal)

    async def _destroy(self) -> list[str]:
        if self._runc_pid is not None:
            kill_group(self._runc_pid)
        if self._init_exit is not None and not self._init_exit.done():
            with contextlib.suppress(asyncio.TimeoutError):
                await self._kill_and_wait()
        elif self._init_exit is None:
            await self.runc.kill(self.container_id)  # never seen running: it may be half created
        await self.runc.delete(self.container_id)  # --force kills whatever might still run in it
        leftovers = await asyncio.to_thread(cgroups.remove, self.cgroup_path)
        await self._drain(0)
        return leftovers
