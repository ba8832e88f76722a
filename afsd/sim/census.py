"""Which processes live in the simulation's network namespaces, what memory they use, and ending them.

A member's processes are recognised by the inode of their network namespace (/proc/PID/ns/net), which
stays the same after the namespace is unpinned: a daemon that forked a child nobody knew about is still
found. Memory is read from /proc/PID/smaps_rollup: RSS (what each process maps, shared pages counted in
every process) and PSS (shared pages divided among their users: what a member really costs the host).
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class Memory:
    rss: int = 0        # bytes
    pss: int = 0        # bytes
    processes: int = 0

    def __add__(self, other: Memory) -> Memory:
        return Memory(self.rss + other.rss, self.pss + other.pss, self.processes + other.processes)


def namespace_inode(pid: int) -> int | None:
    try:
        return os.stat(f"/proc/{pid}/ns/net").st_ino
    except OSError:  # gone, or a kernel thread
        return None


def processes_in(inodes: Iterable[int]) -> dict[int, int]:
    """pid → namespace inode, for every process in one of the namespaces `inodes`."""
    wanted, me = set(inodes), os.getpid()
    found = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != me:
            inode = namespace_inode(int(entry))
            if inode in wanted:
                found[int(entry)] = inode
    return found


def memory_of(pid: int) -> Memory:
    rss = pss = 0
    try:
        with open(f"/proc/{pid}/smaps_rollup") as rollup:
            for line in rollup:
                if line.startswith("Rss:"):
                    rss = int(line.split()[1]) * 1024
                elif line.startswith("Pss:"):
                    pss = int(line.split()[1]) * 1024
    except OSError:
        return Memory()
    return Memory(rss, pss, 1)


def memory_by_namespace(inodes: Iterable[int]) -> dict[int, Memory]:
    """Namespace inode → the summed memory of its processes (0 for a namespace without any)."""
    totals = {inode: Memory() for inode in inodes}
    for pid, inode in processes_in(totals).items():
        totals[inode] = totals[inode] + memory_of(pid)
    return totals


def memory_by_process(inode: int) -> list[tuple[str, Memory]]:
    """(command line, memory) of every process in the namespace `inode`, largest PSS first."""
    found = [(command_line(pid), memory_of(pid)) for pid, _ in processes_in([inode]).items()]
    return sorted(found, key=lambda item: -item[1].pss)


def command_line(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            return handle.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return "?"


def kill_everything_in(inodes: Iterable[int], timeout: float) -> list[str]:
    """SIGKILL every process in the namespaces `inodes` until none is left; return what was killed
    (for the log: after an orderly stop this is empty)."""
    wanted = set(inodes)
    killed: list[str] = []
    deadline = time.monotonic() + timeout
    while found := processes_in(wanted):
        for pid in found:
            killed.append(f"{pid} {command_line(pid)[:200]}")
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"processes in the simulation's namespaces survived SIGKILL: {sorted(found)}")
        time.sleep(0.1)
    return killed
