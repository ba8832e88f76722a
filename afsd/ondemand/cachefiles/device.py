"""Opening and binding /dev/cachefiles in on-demand mode, with one clear line for each way it fails.

Where it sits: the supervisor calls `bind_ondemand` once, before it detaches, so a failure reaches the
node daemon (or the operator) as the launcher's error line; the fd it returns is held by the supervisor
for its whole life and inherited by each worker. `kernel_problem` is the cheap check behind
`FscacheBackend.unavailable_reason` (no device opened). Kernel facts: docs/kernel-protocols.md
sections 1.1-1.4.
"""

from __future__ import annotations

import errno
import gzip
import os
import platform
import stat
from dataclasses import dataclass
from pathlib import Path

from afsd.errors import AfsdError

DEVICE = Path("/dev/cachefiles")
# What cachefiles needs from the cache directory's filesystem (K:fs/cachefiles/cache.c).
DISK_FILESYSTEMS = ("ext4", "xfs", "btrfs")
NEEDED_OPTIONS = ("CONFIG_CACHEFILES_ONDEMAND", "CONFIG_EROFS_FS_ONDEMAND")
KERNEL_HINT = ("build a kernel with them (scripts/kernel-setup.sh build, or `install` on a real host; "
               "docs/kernel-lab.md) or use another backend (fanotify, eager)")


class CachefilesError(AfsdError):
    """/dev/cachefiles cannot be bound as afsd's on-demand cache."""


@dataclass(frozen=True)
class BoundCache:
    fd: int                 # the device fd (close-on-exec; pass it on explicitly)
    cache_dir: Path
    tag: str
    failover: bool          # the kernel knows `restore` (6.8+): a crashed worker can be replaced


def kernel_problem() -> str | None:
    """Why this kernel cannot run the fscache backend, from what is visible without opening the device;
    None when nothing speaks against it (binding may still fail, see `bind_ondemand`)."""
    if not DEVICE.exists():
        return (f"this kernel has no cachefiles on-demand mode ({DEVICE} does not exist): it needs "
                f"{' and '.join(NEEDED_OPTIONS)}; {KERNEL_HINT}")
    if not stat.S_ISCHR(DEVICE.stat().st_mode):
        return f"{DEVICE} is not a character device"
    config = _kernel_config()
    if config is not None:
        missing = [option for option in NEEDED_OPTIONS if f"{option}=y" not in config]
        if missing:
            return (f"this kernel ({platform.release()}) has cachefiles but not {' and '.join(missing)}; "
                    f"{KERNEL_HINT}")
    if "erofs" not in Path("/proc/filesystems").read_text():
        return "this kernel has no erofs (CONFIG_EROFS_FS)"
    return None


def _kernel_config() -> str | None:
    try:
        return gzip.decompress(Path("/proc/config.gz").read_bytes()).decode(errors="replace")
    except OSError:
        pass
    try:
        return Path(f"/boot/config-{platform.release()}").read_text(errors="replace")
    except OSError:
        return None


def bind_ondemand(cache_dir: Path, tag: str) -> BoundCache:
    """Open the device, point it at `cache_dir` (created if missing) and `bind ondemand`."""
    cache_dir = Path(os.path.abspath(cache_dir))
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CachefilesError(f"cannot create the cache directory {cache_dir}: {e.strerror}") from None
    fd = _open_device()
    try:
        _command(fd, f"dir {cache_dir}", cache_dir)
        _command(fd, f"tag {tag}", cache_dir)
        _command(fd, "bind ondemand", cache_dir)
        failover = _probe_restore(fd)
    except BaseException:
        os.close(fd)
        raise
    return BoundCache(fd, cache_dir, tag, failover)


def _open_device() -> int:
    try:
        return os.open(DEVICE, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        raise CachefilesError(kernel_problem() or f"{DEVICE} does not exist") from None
    except PermissionError:
        raise CachefilesError(f"opening {DEVICE} needs root (CAP_SYS_ADMIN): run the node daemon as root") from None
    except OSError as e:
        if e.errno == errno.EBUSY:
            raise CachefilesError(f"{DEVICE} is busy: {_describe_holders()} holds it, and the kernel allows one "
                                  "cachefiles daemon per machine: stop that process (for cachefilesd: "
                                  "`systemctl stop cachefilesd`) and start again") from None
        raise CachefilesError(f"cannot open {DEVICE}: {e.strerror}") from None


def _command(fd: int, command: str, cache_dir: Path) -> None:
    try:
        os.write(fd, command.encode())
    except OSError as e:
        raise CachefilesError(_explain(command.split()[0], e.errno or 0, cache_dir)) from None


def _explain(command: str, code: int, cache_dir: Path) -> str:
    if command == "bind" and code == errno.EINVAL:
        # With `dir` given, EINVAL is what a kernel without CONFIG_CACHEFILES_ONDEMAND answers to
        # "bind ondemand" (it logs "'bind' command doesn't take an argument"); an idmapped cache mount too.
        return (f"the kernel refused `bind ondemand`: this kernel's cachefiles has no on-demand mode "
                f"(CONFIG_CACHEFILES_ONDEMAND), or {cache_dir} is on an idmapped mount; {KERNEL_HINT}")
    if command == "bind" and code == errno.EOPNOTSUPP:
        fstype = filesystem_type(cache_dir)
        return (f"cachefiles cannot keep its cache in {cache_dir}: it is on {fstype}, which lacks what cachefiles "
                f"needs (O_TMPFILE, user xattrs, direct I/O, sync_fs); use a directory on "
                f"{', '.join(DISK_FILESYSTEMS)} (the node daemon's --state-dir)")
    if command == "bind" and code == errno.EROFS:
        return f"cachefiles cannot keep its cache in {cache_dir}: the filesystem is read-only"
    if command == "bind" and code in (errno.ENOBUFS, errno.ENOSPC):
        return f"cachefiles cannot keep its cache in {cache_dir}: the filesystem is (nearly) full"
    if command == "bind" and code == errno.EBUSY:
        return f"{DEVICE} is already bound (another cache with this tag is active?): stop the other cachefiles daemon"
    if command == "dir" and code == errno.EEXIST:
        return f"{DEVICE} already has a cache directory: it is being set up by another process"
    return f"`{command}` on {DEVICE} failed for cache directory {cache_dir}: {os.strerror(code)}"


def _probe_restore(fd: int) -> bool:
    """Right after bind no request exists, so `restore` only tells whether the kernel has failover (6.8+)."""
    try:
        os.write(fd, b"restore")
    except OSError as e:
        if e.errno == errno.EOPNOTSUPP:
            return False
        raise CachefilesError(f"`restore` on {DEVICE} failed: {e.strerror}") from None
    return True


def filesystem_type(path: Path) -> str:
    """The type of the filesystem holding `path` (from /proc/self/mountinfo), e.g. "tmpfs"."""
    try:
        device = os.stat(path).st_dev
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            fields = line.split()
            major, minor = (int(n) for n in fields[2].split(":"))
            if os.makedev(major, minor) == device:
                return fields[fields.index("-") + 1]
    except (OSError, ValueError, IndexError):
        pass
    return "an unknown filesystem"


def _describe_holders() -> str:
    holders = device_holders()
    if not holders:
        return "another process (not visible from here)"
    return ", ".join(f"pid {pid} ({name})" for pid, name in holders)


def device_holders() -> list[tuple[int, str]]:
    """(pid, command name) of every process with /dev/cachefiles open."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            for fd in (entry / "fd").iterdir():
                if os.readlink(fd) == str(DEVICE):
                    found.append((int(entry.name), (entry / "comm").read_text().strip()))
                    break
        except OSError:
            continue
    return sorted(found)
