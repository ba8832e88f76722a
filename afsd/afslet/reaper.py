"""afslet as a child subreaper: orphans (container inits whose `runc run -d` has exited, anything a
killed runc left) are re-parented to afslet instead of init, so afslet can wait for them and no zombie
is left behind.

Three kinds of children, and who reaps each:
- processes afslet spawned through asyncio (`spawn`): asyncio's child watcher waits for them;
- container inits a session waits for (`claim`): the session waits, through a pidfd;
- every other child (an orphan nobody waits for): the reaper, when it is a zombie.

The reaper must never take an exit status that belongs to the first two, so it only looks at
children that are neither spawned nor claimed, and not at all while a spawn or a claim is in progress
(`holding`): between a fork and the pid being recorded, and between `runc run -d` exiting and its
container's pid being claimed, a zombie is not yet known to be someone's.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import signal
from collections.abc import Iterator
from pathlib import Path

from prometheus_client import Counter

log = logging.getLogger(__name__)

PR_SET_CHILD_SUBREAPER = 36
SWEEP_PERIOD = 5.0

ORPHANS_REAPED = Counter("afsd_let_orphans_reaped_total", "Orphaned zombie processes reaped by afslet")


def become_subreaper() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        error = ctypes.get_errno()
        raise OSError(error, f"prctl(PR_SET_CHILD_SUBREAPER): {os.strerror(error)}")


def child_pids(pid: int | None = None) -> list[int]:
    """Direct children of `pid` (default: this process), from /proc/<pid>/task/*/children."""
    base = Path(f"/proc/{pid or os.getpid()}/task")
    found: list[int] = []
    with contextlib.suppress(FileNotFoundError):
        for task in base.iterdir():
            with contextlib.suppress(FileNotFoundError, ProcessLookupError):
                found.extend(int(p) for p in (task / "children").read_text().split())
    return found


def process_state(pid: int) -> str:
    """The one-letter state from /proc/<pid>/stat ("" if gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return ""
    return stat[stat.rfind(")") + 2:][:1]


class Subreaper:
    def __init__(self) -> None:
        self._spawned: set[int] = set()
        self._claimed: dict[int, asyncio.Future[int]] = {}
        self._holds = 0
        self._sweep_wanted = False
        self._task: asyncio.Task[None] | None = None
        self.reaped = 0

    # -- lifecycle ------------------------------------------------------------------------------

    def install(self) -> None:
        become_subreaper()
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGCHLD, self.sweep)
        self._task = asyncio.create_task(self._periodic())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        with contextlib.suppress(RuntimeError, ValueError):
            asyncio.get_running_loop().remove_signal_handler(signal.SIGCHLD)
        self.sweep()

    async def _periodic(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_PERIOD)
            self.sweep()

    # -- ownership ------------------------------------------------------------------------------

    @contextlib.contextmanager
    def holding(self) -> Iterator[None]:
        """No sweeping inside this block (a child that exits now may be about to be spawned/claimed)."""
        self._holds += 1
        try:
            yield
        finally:
            self._holds -= 1
            if self._holds == 0 and self._sweep_wanted:
                asyncio.get_running_loop().call_soon(self.sweep)

    async def spawn(self, *argv: str, **kwargs: object) -> asyncio.subprocess.Process:
        """`asyncio.create_subprocess_exec`, with the child kept away from the sweeper until it is waited for."""
        with self.holding():
            process = await asyncio.create_subprocess_exec(*argv, **kwargs)  # type: ignore[arg-type]
            pid = process.pid
            self._spawned.add(pid)

        def forget(_: object) -> None:
            self._spawned.discard(pid)

        asyncio.ensure_future(process.wait()).add_done_callback(forget)
        return process

    def claim(self, pid: int) -> asyncio.Future[int]:
        """Wait for `pid` (a child of ours, usually by re-parenting); the future gets its wait status.

        Call it inside `holding()` that also covered whatever made `pid` our child.
        """
        loop = asyncio.get_running_loop()
        future: asyncio.Future[int] = loop.create_future()
        pidfd = os.pidfd_open(pid)
        self._claimed[pid] = future

        def ready() -> None:
            try:
                waited, status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                # Not our child after all (afslet is not the subreaper it should be): nothing to reap.
                waited, status = pid, -1
            if waited == 0:
                return
            loop.remove_reader(pidfd)
            os.close(pidfd)
            self._claimed.pop(pid, None)
            if not future.done():
                future.set_result(status)

        loop.add_reader(pidfd, ready)
        return future

    # -- sweeping -------------------------------------------------------------------------------

    def sweep(self) -> None:
        """Reap zombie children that nobody else waits for."""
        if self._holds:
            self._sweep_wanted = True
            return
        self._sweep_wanted = False
        for pid in child_pids():
            if pid in self._spawned or pid in self._claimed:
                continue
            if process_state(pid) != "Z":
                continue
            with contextlib.suppress(ChildProcessError):
                waited, status = os.waitpid(pid, os.WNOHANG)
                if waited:
                    self.reaped += 1
                    ORPHANS_REAPED.inc()
                    log.info("reaped orphan %d (status %d)", pid, status)
