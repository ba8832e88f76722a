"""The mount(2)/umount2(2) primitives for converted layer blobs: file-backed erofs and overlayfs.

Data flow: erofs blob files -> `mount_erofs` (one read-only mount per layer) -> `mount_overlay` (the
layers as lowerdirs, top first) -> the container's root file system. `stack.mount_image_stack` puts an
image's layers together with these and always unmounts.

`mount_erofs` calls mount(2) directly with the image FILE as the source: the kernel
(`EROFS_FS_BACKED_BY_FILE`) then reads the file itself, with no loop device. mount(8) would silently set
up a loop device instead, which matters for on-demand filling (loop I/O raises no fanotify events).
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
from collections.abc import Sequence
from pathlib import Path

from afsd.errors import MountError

MS_RDONLY = 0x1
MNT_DETACH = 0x2
# Read-ahead of the erofs mounts afsd makes: one chunk of the blob (afsd.erofs.convert.CHUNK_SIZE), which a
# lazy fill fetches whole anyway, so a larger window costs no extra bytes and saves round trips.
READ_AHEAD_KIB = 1024
_SYSFS_PATH_SIZE = 129                       # struct fs_sysfs_path { __u8 len; __u8 name[128]; }
_FS_IOC_GETFSSYSFSPATH = (2 << 30) | (_SYSFS_PATH_SIZE << 16) | (0x15 << 8) | 1   # _IOR(0x15, 1, ...)
_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_void_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]


def mount_erofs(blob: Path, target: Path) -> None:
    """Mount the erofs image file `blob` read-only at the existing directory `target`."""
    _mount(os.fsencode(blob), target, b"erofs", MS_RDONLY, None, what=f"erofs image {blob}")
    set_read_ahead(target)


def set_read_ahead(target: Path, kib: int = READ_AHEAD_KIB) -> bool:
    """Best effort: the read-ahead of the erofs mount at `target` (its backing device info, found by
    FS_IOC_GETFSSYSFSPATH, Linux 6.8+); False if it cannot be set. The kernel's default, 128 KiB, makes a
    lazily filled blob answer 8 requests per MiB-sized chunk it fetches whole anyway."""
    try:
        fd = os.open(target, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            answer = fcntl.ioctl(fd, _FS_IOC_GETFSSYSFSPATH, bytes(_SYSFS_PATH_SIZE))
        finally:
            os.close(fd)
        name = answer[1:1 + answer[0]].decode().rsplit("/", 1)[-1]   # "erofs/erofs-7205": its bdi's name
        if not name or "/" in name or name.startswith("."):
            return False
        Path("/sys/class/bdi", name, "read_ahead_kb").write_text(str(kib))
    except (OSError, UnicodeDecodeError):
        return False
    return True


def mount_overlay(lowers: Sequence[Path], target: Path, *, upper: Path | None = None,
                  work: Path | None = None, volatile: bool = False) -> None:
    """Mount overlayfs at `target` with `lowers` (top layer first); read-only unless `upper` is given.

    The kernel refuses a read-only overlay of a single lower directory; `stack.mount_image_stack` adds
    an empty bottom layer in that case.

    `volatile` (with an upper; Linux 5.10+): the overlay never syncs the upper's file system. Without it,
    unmounting the overlay syncs that WHOLE file system (`ovl_sync_fs`), dirty pages of unrelated files
    included: on a node that has just filled a blob on the same disk, 30-200 ms (measured) that a task's
    scratch upper does not need. The users' fsync/syncfs inside it are skipped too, and the kernel refuses
    to mount the same work dir again (it leaves an `incompat/volatile` mark in it): for uppers thrown away
    with the task only.
    """
    if len(lowers) < (1 if upper is not None else 2):
        raise ValueError("overlayfs needs two or more lower directories when there is no upper directory")
    if (upper is None) != (work is None):
        raise ValueError("mount_overlay needs both upper and work, or neither")
    options = "lowerdir=" + ":".join(_escape(p) for p in lowers)
    if upper is not None and work is not None:
        options += f",upperdir={_escape(upper)},workdir={_escape(work)}" + (",volatile" if volatile else "")
    data = os.fsencode(options)
    if len(data) >= _PAGE_SIZE:
        raise MountError(
            f"overlay options for {target} are {len(data)} bytes, over the kernel's {_PAGE_SIZE}-byte "
            "limit: use shorter layer mount paths"
        )
    flags = 0 if upper is not None else MS_RDONLY
    _mount(b"overlay", target, b"overlay", flags, data, what=f"overlay of {len(lowers)} layers")


def mount_tmpfs(target: Path, size_bytes: int = 0) -> None:
    """Mount a fresh tmpfs at `target` (mode 0755; `size_bytes` 0 means the kernel's default)."""
    options = "mode=0755" + (f",size={size_bytes}" if size_bytes > 0 else "")
    _mount(b"tmpfs", target, b"tmpfs", 0, options.encode(), what="tmpfs")


def unmount(target: Path, *, detach: bool = False) -> None:
    """Unmount `target`; `detach` makes it lazy (MNT_DETACH) so a busy mount still goes away."""
    if _libc.umount2(os.fsencode(target), MNT_DETACH if detach else 0) != 0:
        code = ctypes.get_errno()
        hint = " (still in use: close files under it, or unmount with detach)" if code == errno.EBUSY else ""
        raise MountError(f"cannot unmount {target}: {os.strerror(code)}{hint}")


def _mount(source: bytes, target: Path, fstype: bytes, flags: int, data: bytes | None, *, what: str) -> None:
    if _libc.mount(source, os.fsencode(target), fstype, flags, data) != 0:
        code = ctypes.get_errno()
        hint = ""
        if code == errno.EPERM:
            hint = " (mounting needs root / CAP_SYS_ADMIN)"
        elif code == errno.ENOTBLK and fstype == b"erofs":
            hint = " (this kernel cannot mount erofs from a file: it needs EROFS_FS_BACKED_BY_FILE, Linux 6.12+)"
        elif code == errno.ENODEV:
            hint = f" (the kernel has no {fstype.decode()} file system)"
        raise MountError(f"cannot mount {what} at {target}: {os.strerror(code)}{hint}")


def _escape(path: Path) -> str:
    # overlayfs splits its options on ',' and lowerdir on ':'; a backslash escapes either.
    text = os.fspath(path)
    return text.replace("\\", "\\\\").replace(",", "\\,").replace(":", "\\:")
