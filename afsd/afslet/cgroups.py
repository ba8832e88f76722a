"""A container's cgroup as afslet sees it: what it used (read while it runs, for `afsd ps`, and once
when it has ended, for the `resource` summary), whether the OOM killer struck, and removing it.

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
    """What a container's cgroup has counted so far (all zero for a cgroup that does not exist)."""

    cpu_ns: int = 0                 # user + system
    cpu_user_ns: int = 0
    cpu_system_ns: int = 0
    memory_current_bytes: int = 0
    peak_memory_bytes: int = 0
    oom_kills: int = 0
    io_read_bytes: int = 0
    io_write_bytes: int = 0
    pids_current: int = 0
    pids_peak: int = 0


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


def _keyed_all(path: Path) -> dict[str, int]:
    """A flat keyed file (`name value` per line), e.g. cpu.stat."""
    values: dict[str, int] = {}
    try:
        for line in path.read_text().splitlines():
            name, _, value = line.partition(" ")
            with contextlib.suppress(ValueError):
                values[name] = int(value)
    except OSError:
        pass
    return values


def _cpu(directory: Path) -> tuple[int, int, int] | None:
    """(total, user, system) ns from cgroup2's cpu.stat, else from cgroup v1's cpuacct."""
    stat = _keyed_all(directory / "cpu.stat")
    if "usage_usec" in stat:
        return (stat["usage_usec"] * 1000, stat.get("user_usec", 0) * 1000, stat.get("system_usec", 0) * 1000)
    total = _read_int(directory / "cpuacct.usage")
    if total is None:
        return None
    # v1 splits user/system by timer ticks, while the total is precise: scale the split to the total,
    # as cgroup2 (the kernel's cputime_adjust) does, so that user + system == total.
    user, system = _read_int(directory / "cpuacct.usage_user") or 0, _read_int(directory / "cpuacct.usage_sys") or 0
    if system == 0:
        return total, total, 0
    if user == 0:
        return total, 0, total
    scaled_user = total * user // (user + system)
    return total, scaled_user, total - scaled_user


def _block_io(directory: Path) -> tuple[int, int] | None:
    """(read, written) bytes: cgroup2's io.stat, or v1's blkio.throttle.io_service_bytes_recursive."""
    read = written = 0
    found = False
    with contextlib.suppress(OSError):
        for line in (directory / "io.stat").read_text().splitlines():
            found = True
            for field in line.split()[1:]:
                key, _, value = field.partition("=")
                if key == "rbytes":
                    read += int(value)
                elif key == "wbytes":
                    written += int(value)
    with contextlib.suppress(OSError):
        for line in (directory / "blkio.throttle.io_service_bytes_recursive").read_text().splitlines():
            fields = line.split()
            if len(fields) == 3 and fields[1] in ("Read", "Write"):
                found = True
                if fields[1] == "Read":
                    read += int(fields[2])
                else:
                    written += int(fields[2])
    return (read, written) if found else None


def usage(cgroup_path: str) -> CgroupUsage:
    """Read every counter from whichever hierarchy has it (on a hybrid host: v1 controllers, and the
    cgroup2 tree for CPU time); where two report the same thing, the larger number wins."""
    cpu = (0, 0, 0)
    memory = peak = oom = io_read = io_written = pids = pids_peak = 0
    for directory in directories(cgroup_path):
        if (times := _cpu(directory)) is not None and times[0] > cpu[0]:
            cpu = times
        for name in ("memory.usage_in_bytes", "memory.current"):
            if (value := _read_int(directory / name)) is not None:
                memory = max(memory, value)
        for name in ("memory.max_usage_in_bytes", "memory.peak"):
            if (value := _read_int(directory / name)) is not None:
                peak = max(peak, value)
        if (value := _keyed(directory / "memory.oom_control", "oom_kill")) is not None:
            oom = max(oom, value)
        if (value := _keyed(directory / "memory.events", "oom_kill")) is not None:
            oom = max(oom, value)
        if (io := _block_io(directory)) is not None:
            io_read, io_written = max(io_read, io[0]), max(io_written, io[1])
        if (value := _read_int(directory / "pids.current")) is not None:
            pids = max(pids, value)
        if (value := _read_int(directory / "pids.peak")) is not None:
            pids_peak = max(pids_peak, value)
    return CgroupUsage(cpu_ns=cpu[0], cpu_user_ns=cpu[1], cpu_system_ns=cpu[2], memory_current_bytes=memory,
                       peak_memory_bytes=max(peak, memory), oom_kills=oom, io_read_bytes=io_read,
                       io_write_bytes=io_written, pids_current=pids, pids_peak=max(pids_peak, pids))


def _pids(directory: Path) -> list[int]:
    try:
        return [int(p) for p in (directory / "cgroup.procs").read_text().split()]
    except (OSError, ValueError):
        return []


def kill_all(cgroup_path: str) -> int:
    """SIGKILL every process in the cgroup (cgroup2's cgroup.kill where there is one); return how many
    processes were signalled one by one."""
    killed = 0
    for directory in directories(cgroup_path):
        with contextlib.suppress(OSError):
            (directory / "cgroup.kill").write_text("1")
        for pid in _pids(directory):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
                killed += 1
    return killed


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
