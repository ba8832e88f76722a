"""One container's life: `runc run --detach`, its output, its exit, and its removal.

`runc run --detach` starts the container and exits; the container's init is then re-parented to
afslet (a child subreaper), which waits for it directly. This gives the command's real wait status,
keeps the cgroup (and its OOM counter and CPU time) until afslet has read it, and splits start from run.
When the container's namespaces need work before its command runs (`before_start`: attaching its
network namespace to the bridge), it is `runc create` instead, then that work with the init's pid, then
`runc start`.
runc passes its stdout/stderr pipes through to the container, so what arrives on stderr before runc
has exited is runc's own complaint if the start fails, and the container's otherwise: it is held back
until runc's exit says which.

Stopping a running command (its timeout, `afsd stop`, afslet's shutdown, a client gone) is the
staged abort of stopping.py: `abort` starts it once; `run` reports which stage ended the command.

`destroy` is idempotent and is what every path ends with (success, failure, timeout, cancellation):
kill runc's process group if it still runs, the staged abort if the init still runs, `runc delete
--force`, and kill and remove whatever is left in the cgroup.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

from afsd import phases
from afsd.afslet import cgroups
from afsd.afslet.errors import ContainerStuckError, SetupError
from afsd.afslet.outcome import EXIT_CANNOT_EXECUTE, EXIT_NOT_FOUND, EXIT_SETUP_FAILED
from afsd.afslet.output import LineSink, open_pipe_reader, pump_lines
from afsd.afslet.runc import Runc, kill_group, runc_error
from afsd.afslet.stopping import Note, StopPolicy, StopReason, StopResult, staged_stop

log = logging.getLogger(__name__)

START_TIMEOUT = 60.0
OUTPUT_DRAIN = 5.0


@dataclass
class ContainerExit:
    wait_status: int
    stop: StopResult | None  # why and how afslet stopped it, if it did
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
    stop_policy: StopPolicy = field(default_factory=StopPolicy)
    interrupt_on_stop: bool = False      # the workload asked for the SIGINT stage
    note: Note = lambda line: None       # progress of a staged abort, as it happens
    _runc_pid: int | None = None
    _init_pid: int | None = None
    _init_exit: asyncio.Future[int] | None = None
    _started: bool = False
    _pumps: list[asyncio.Task[int]] = field(default_factory=list)
    _removal: asyncio.Future[list[str]] | None = None
    _stop_reason: StopReason | None = None
    _stopping: asyncio.Future[StopResult] | None = None
    _gave_up: asyncio.Future[None] | None = None    # resolved if even the last resort did not end the init
    final_usage: cgroups.CgroupUsage | None = None  # read once the init has exited

    @property
    def started(self) -> bool:
        return self._started

    @property
    def running(self) -> bool:
        return self._init_exit is not None and not self._init_exit.done()

    @property
    def stop_reason(self) -> StopReason | None:
        return self._stop_reason

    @property
    def exit_status(self) -> int | None:
        """The init's wait status once it has exited (-1: it was not ours to wait for)."""
        if self._init_exit is None or not self._init_exit.done() or self._init_exit.cancelled():
            return None
        return self._init_exit.result()

    @property
    def stopping(self) -> bool:
        return self._stopping is not None and not self._stopping.done()

    def abort(self, reason: StopReason) -> None:
        """Stop the command with the staged abort (once; the first reason counts). Before the container
        has started this only records the wish: `run` stops it as soon as it runs."""
        if self._stop_reason is None:
            self._stop_reason = reason
        if self.running and self._started and self._stopping is None:
            self._stopping = asyncio.ensure_future(self._staged_stop(self._stop_reason))

    async def stopped(self) -> StopResult | None:
        """The staged abort's result once it has finished; None if there was none."""
        if self._stopping is None:
            return None
        return await asyncio.shield(self._stopping)

    async def _staged_stop(self, reason: StopReason) -> StopResult:
        assert self._init_exit is not None

        def send(sig: int) -> None:
            # The init is our child and not yet reaped while its exit future is pending (the reaper
            # resolves it from the same event loop), so its pid cannot have been reused.
            if self._init_pid is not None and not self._init_exit.done():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self._init_pid, sig)

        try:
            return await staged_stop(reason=reason, policy=self.stop_policy, interrupt=self.interrupt_on_stop,
                                     exited=self._init_exit, send=send,
                                     kill_everything=lambda: asyncio.to_thread(cgroups.kill_all, self.cgroup_path),
                                     note=self.note)
        except TimeoutError:
            if self._gave_up is not None and not self._gave_up.done():
                self._gave_up.set_result(None)
            raise

    async def run(self, timeout_s: float, stdout: LineSink, stderr: LineSink,
                  before_start: Callable[[int], Awaitable[None]] | None = None) -> ContainerExit:
        """Start the container and wait for it to exit (stopping it, staged, at `timeout_s` after the start).
        `before_start(init_pid)` runs between `runc create` and `runc start`; SetupError if it fails."""
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
                verb = ("run", "--detach") if before_start is None else ("create",)
                try:
                    process = await reaper.spawn(
                        *self.runc.argv(*verb, "--pid-file", str(pid_file), "--bundle", str(self.bundle),
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
                    self._init_pid = init_pid
                    if before_start is not None:
                        await self._start_created(init_pid, before_start)
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
        if self._stop_reason is not None:  # asked to stop while it was starting
            self.abort(self._stop_reason)
        self._gave_up = loop.create_future()
        timer = loop.call_later(timeout_s, self.abort, StopReason.TIMEOUT)
        try:
            await asyncio.wait([self._init_exit, self._gave_up], return_when=asyncio.FIRST_COMPLETED)
        finally:
            timer.cancel()
        if not self._init_exit.done():
            raise ContainerStuckError(f"container {self.container_id}: its command survived SIGKILL and the killing "
                                      f"of its cgroup {self.cgroup_path} (a process stuck in the kernel?)")
        status = self._init_exit.result()
        exited_at = loop.time()
        stop = await self.stopped()
        usage = await self._read_final_usage()
        await self._drain(OUTPUT_DRAIN)
        return ContainerExit(status, stop, usage, started_at - spawned_at, exited_at - started_at)

    async def _start_created(self, init_pid: int, before_start: Callable[[int], Awaitable[None]]) -> None:
        """`before_start`, then `runc start`: the created container's init runs the command from here."""
        try:
            await before_start(init_pid)
        except OSError as error:
            raise SetupError(f"preparing container {self.container_id}: {error}") from None
        result = await self.runc.call("start", self.container_id, timeout=START_TIMEOUT)
        if result.returncode != 0:
            raise SetupError(f"runc could not start the command: {result.stderr.strip() or result.stdout.strip()}")

    async def _read_final_usage(self) -> cgroups.CgroupUsage:
        """What the cgroup counted, read after the init's exit and before `runc delete` removes it."""
        if self.final_usage is None:
            self.final_usage = await asyncio.to_thread(cgroups.usage, self.cgroup_path)
        return self.final_usage

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
        if self.running and self._started:
            self.abort(StopReason.CANCELLED)  # the call ended without waiting for its command
        # (created but never started: `runc delete --force` below kills its waiting init)
        if self._stopping is not None:
            try:
                await asyncio.shield(self._stopping)
            except TimeoutError:
                log.error("container %s: its init survived the staged abort", self.container_id)
            if self._init_exit is not None and self._init_exit.done():
                await self._read_final_usage()
        elif self._init_exit is None:
            await self.runc.kill(self.container_id)  # never seen running: it may be half created
        with phases.phase("container.delete"):
            await self.runc.delete(self.container_id)  # --force kills whatever might still run in it
        with phases.phase("container.cgroup"):
            leftovers = await asyncio.to_thread(cgroups.remove, self.cgroup_path)
        await self._drain(0)
        return leftovers
