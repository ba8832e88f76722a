"""Idmapped mounts for `--userns`: the image's shared read-only layers seen with their owners shifted into
the containers' user namespace, without copying or chowning a byte.

runc 1.1 cannot make idmapped mounts itself, so afslet builds the container's rootfs before handing it
over: each lower directory of the node daemon's (read-only) image overlay is cloned with open_tree(2)
and given the user namespace's mapping with mount_setattr(2) (MOUNT_ATTR_IDMAP), and a new overlay is
mounted over those clones with the session's writable upper. Measured on this kernel (6.18): erofs and
ext4 mounts accept an idmap, an overlayfs mount does not (EINVAL), and overlayfs over idmapped lower
layers works. The upper is NOT idmapped (overlayfs creates its work dir with the mounter's host uid 0,
which a mapped upper cannot represent: EOVERFLOW), so files the container writes are stored with host
ids (container root = host `start`), and the tar of the upper shifts them back (upper_tar.py).

The user namespace that carries the mapping is made once per afslet by a helper process (`unshare
--user`; a multi-threaded process cannot unshare one itself) and kept as an open fd.
"""

from __future__ import annotations

import ctypes
import os
import re
import subprocess
import time
from pathlib import Path

from afsd.afslet.bundle import IdMap

SYS_OPEN_TREE = 428
SYS_MOVE_MOUNT = 429
SYS_MOUNT_SETATTR = 442
OPEN_TREE_CLONE = 1
OPEN_TREE_CLOEXEC = os.O_CLOEXEC
AT_FDCWD = -100
AT_EMPTY_PATH = 0x1000
MOVE_MOUNT_F_EMPTY_PATH = 0x4
MOUNT_ATTR_NOSUID = 0x2
MOUNT_ATTR_NODEV = 0x4
MOUNT_ATTR_IDMAP = 0x00100000

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


class MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64), ("propagation", ctypes.c_uint64),
                ("userns_fd", ctypes.c_uint64)]


class IdmapError(OSError):
    """An idmapped mount could not be made."""


def _fail(what: str) -> IdmapError:
    code = ctypes.get_errno()
    return IdmapError(code, f"{what}: {os.strerror(code)}")


def set_mount_attributes(path: Path, attributes: int) -> None:
    """Set per-mount flags (MOUNT_ATTR_NOSUID, ...) of the mount at `path`, in place."""
    attr = MountAttr(attributes, 0, 0, 0)
    if _libc.syscall(SYS_MOUNT_SETATTR, AT_FDCWD, os.fsencode(path), 0, ctypes.byref(attr),
                     ctypes.sizeof(attr)) != 0:
        raise _fail(f"setting mount attributes of {path}")


def idmapped_clone(source: Path, target: Path, userns_fd: int) -> None:
    """Attach at `target` a clone of the mount at `source`, idmapped by `userns_fd`'s mapping, nosuid, nodev."""
    fd = _libc.syscall(SYS_OPEN_TREE, AT_FDCWD, os.fsencode(source), OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC)
    if fd < 0:
        raise _fail(f"cloning the mount at {source}")
    try:
        attr = MountAttr(MOUNT_ATTR_IDMAP | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV, 0, 0, userns_fd)
        if _libc.syscall(SYS_MOUNT_SETATTR, fd, b"", AT_EMPTY_PATH, ctypes.byref(attr), ctypes.sizeof(attr)) != 0:
            raise _fail(f"idmapping the mount of {source}")
        if _libc.syscall(SYS_MOVE_MOUNT, fd, b"", AT_FDCWD, os.fsencode(target), MOVE_MOUNT_F_EMPTY_PATH) != 0:
            raise _fail(f"attaching the idmapped mount of {source} at {target}")
    finally:
        os.close(fd)


def user_namespace_fd(id_map: IdMap, timeout: float = 10.0) -> int:
    """An fd of a new user namespace with `id_map` as its uid and gid mapping."""
    helper = subprocess.Popen(["unshare", "--user", "--", "cat"], stdin=subprocess.PIPE,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        own = os.readlink("/proc/self/ns/user")
        deadline = time.monotonic() + timeout
        while os.readlink(f"/proc/{helper.pid}/ns/user") == own:
            if helper.poll() is not None or time.monotonic() > deadline:
                detail = helper.stderr.read().decode(errors="replace").strip() if helper.stderr else ""
                raise IdmapError(0, f"cannot create a user namespace with `unshare --user`: {detail or 'timed out'}")
            time.sleep(0.005)
        line = f"0 {id_map.host_start} {id_map.size}\n"
        Path(f"/proc/{helper.pid}/uid_map").write_text(line)
        Path(f"/proc/{helper.pid}/setgroups").write_text("deny\n")
        Path(f"/proc/{helper.pid}/gid_map").write_text(line)
        return os.open(f"/proc/{helper.pid}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
    finally:
        helper.kill()
        helper.wait()


_ESCAPE = re.compile(r"\\([0-7]{3})")


def _unescape(text: str) -> str:
    return _ESCAPE.sub(lambda match: chr(int(match.group(1), 8)), text)


def overlay_lower_dirs(mountpoint: Path, mountinfo: str | None = None) -> list[Path]:
    """The lowerdirs (top first) of the overlay mounted at `mountpoint`, from /proc/self/mountinfo."""
    text = mountinfo if mountinfo is not None else Path("/proc/self/mountinfo").read_text()
    for line in text.splitlines():
        fields = line.split(" ")
        if len(fields) < 10 or _unescape(fields[4]) != str(mountpoint):
            continue
        separator = fields.index("-")
        if fields[separator + 1] != "overlay":
            continue
        options = fields[separator + 3]
        for option in re.split(r"(?<!\\),", options):
            if option.startswith("lowerdir="):
                parts = re.split(r"(?<!\\):", option[len("lowerdir="):])
                return [Path(_unescape(part).replace("\\:", ":").replace("\\,", ",")) for part in parts if part]
    raise IdmapError(0, f"no overlay with lower directories is mounted at {mountpoint}")
