"""Mounting an erofs blob in fscache mode (`mount -t erofs none TARGET -o fsid=NAME[,domain_id=D]`) and
finding such mounts.

Where it sits: `FscacheBackend.mount` calls `mount_fscache` from a thread of the node daemon, never from
the worker's request loop: mount(2) blocks until the worker answers the blob's OPEN request (a request
loop that mounted would wait for itself forever).
"""

from __future__ import annotations

import ctypes
import errno
import os
import re
from collections.abc import Sequence
from pathlib import Path

from afsd.erofs.mount import set_read_ahead
from afsd.errors import MountError

MS_RDONLY = 0x1

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_void_p]


class FscacheMountError(MountError):
    """An erofs mount in fscache mode failed."""


def mount_options(fsid: str, domain_id: str = "", devices: Sequence[str] = ()) -> str:
    options = f"fsid={fsid}" + (f",domain_id={domain_id}" if domain_id else "")
    return options + "".join(f",device={device}" for device in devices)


def mount_fscache(fsid: str, target: Path, *, domain_id: str = "", devices: Sequence[str] = ()) -> None:
    """Mount the registered blob `fsid` read-only at `target`; its misses become READ requests."""
    options = mount_options(fsid, domain_id, devices)
    if _libc.mount(b"none", os.fsencode(target), b"erofs", MS_RDONLY, options.encode()) == 0:
        set_read_ahead(target)   # larger READ requests (up to a chunk) where the kernel finds its bdi
        return
    code = ctypes.get_errno()
    where = f"{target} (-o {options})"
    if code in (errno.EBUSY, errno.EEXIST):
        elsewhere = [m for m in fscache_mounts().get(fsid, []) if m != str(target)]
        scope = f"domain {domain_id}" if domain_id else "the machine"
        raise FscacheMountError(
            f"cannot mount blob {fsid} at {where}: it is already mounted in fscache mode"
            + (f" at {', '.join(elsewhere)}" if elsewhere else "")
            + f", and the kernel allows one mount per fsid in {scope}: use that mount (bind-mount it) "
            "or unmount it first")
    if code == errno.EPERM:
        raise FscacheMountError(f"cannot mount blob {fsid} at {where}: mounting needs root (CAP_SYS_ADMIN)")
    if code == errno.ENOTBLK or code == errno.ENODEV:
        raise FscacheMountError(f"cannot mount blob {fsid} at {where}: this kernel's erofs has no fscache mode "
                                "(CONFIG_EROFS_FS_ONDEMAND)")
    raise FscacheMountError(
        f"cannot mount blob {fsid} at {where}: {os.strerror(code)} (is the blob registered with the fscache "
        "supervisor, and does its source serve it? see the supervisor's log)")


def fscache_mounts() -> dict[str, list[str]]:
    """fsid -> mount points of every erofs mount in fscache mode (from /proc/self/mountinfo)."""
    found: dict[str, list[str]] = {}
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        try:
            dash = fields.index("-")
        except ValueError:
            continue
        if fields[dash + 1] != "erofs" or len(fields) < dash + 4:
            continue
        for option in fields[dash + 3].split(","):
            if option.startswith("fsid="):
                found.setdefault(option[5:], []).append(_unescape(fields[4]))
    return found


def _unescape(field: str) -> str:
    """mountinfo writes space, tab, newline and backslash as octal escapes."""
    return re.sub(r"\\([0-7]{3})", lambda match: chr(int(match.group(1), 8)), field)
