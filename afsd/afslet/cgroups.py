"""A container's cgroup as afslet sees it: what it used, whether the OOM killer struck, and removing it.

runc creates the cgroup at an absolute path (`--cgroup-parent`/<container id>) in every mounted
hierarchy: on this host's hybrid layout that is each v1 controller plus the cgroup2 tree at
/sys/fs/cgroup/unified; on a pure cgroup2 host it is one directory. Reading is done before
`runc delete`, which removes the directories; `remove` is the safety net for every path where runc
did not get to (killed runc, crash recovery): it kills what is left inside and removes the directories.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class CgroupUsage:
    cpu_ns: int = 0
    peak_memory_bytes: int = 0
    oom_kills: int = 0


def _hierarchies() -> list[Path]:
    points = []
    with open("/proc/self/mounts", "rb") as mounts:
        for line in mounts:
            fields = line.split()
            if len(fields) > 2 and fields[2] in (b"cgroup", b"cgroup2"):
                points.append(Path(fields[1].decode().replace("\\040", " ")))
    return points


def directories(cgroup_path: str) -> list[Path]:
    """The existing directories of `cgroup_path` (absolute, e.g. /afsd-let/afslet-123) in every hierarchy."""
    relative = cgroup_path.strip("/")
    return [d for d in (h / relative for h in _hierarchies()) if d.is_dir()]


def _read_int(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _keyed(path: Path, key: str) -> int | None:
    try:
        for line in path.read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == key:
                return int(value)
    except (OSError, ValueError):
        return None
    return None


def usage(cgroup_path: str) -> CgroupUsage:
    cpu_ns = peak = oom = 0
    for directory in directories(cgroup_path):
        if (value := _read_int(directory / "cpuacct.usage")) is not None:
            cpu_ns = max(cpu_ns, value)
        if (value := _keyed(directory / "cpu.stat", "usage_usec")) is not None:
            cpu_ns = max(cpu_ns, value * 1000)
        if (value := _read_int(directory / "memory.max_usage_in_bytes")) is not None:
            peak = max(peak, value)
        if (value := _read_int(directory / "memory.peak")) is not None:
            peak = max(peak, value)
        if (value := _keyed(directory / "memory.oom_control", "oom_kill")) is not None:
            oom = max(oom, value)
        if (value := _keyed(directory / "memory.events", "oom_kill")) is not None:
            oom = max(oom, value)
    return CgroupUsage(cpu_ns, peak, oom)


def _pids(directory: Path) -> list[int]:
    try:
        return [int(p) for p in (directory / "cgroup.procs").read_text().split()]
    except (OSError, ValueError):
        return []


def remove(cgroup_path: str, timeout: float = 5.0) -> list[str]:
    """Kill every process left in the cgroup and remove its directories; return what could not be removed."""
    leftovers = []
    for directory in directories(cgroup_path):
        deadline = time.monotonic() + timeout
        while True:
            pids = _pids(directory)
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            try:
                directory.rmdir()
                break
            except FileNotFoundError:
                break
            except OSError:
                if time.monotonic() > deadline:
                    leftovers.append(str(directory))
                    break
                time.sleep(0.02)
    return leftovers


def children(cgroup_parent: str) -> list[str]:
    """Absolute cgroup paths directly under `cgroup_parent`, in any hierarchy."""
    found = set()
    for directory in directories(cgroup_parent):
        for child in directory.iterdir():
            if child.is_dir():
                found.add(f"/{cgroup_parent.strip('/')}/{child.name}")
    return sorted(found)


def remove_if_empty(cgroup_parent: str) -> None:
    for directory in directories(cgroup_parent):
        with contextlib.suppress(OSError):
            directory.rmdir()
