"""Run erofs-utils: build a reproducible erofs image from a staging directory, and check one.

Data flow: staging directory (from `unpack.unpack_layer`) -> `build_image` -> image file ->
`layout.data_map`. Reproducibility: the same staging tree gives the same bytes on any node because
- the UUID is passed in (derived from the blob id by the caller),
- SOURCE_DATE_EPOCH fixes the superblock's build time. mkfs.erofs 1.5 also CLAMPS every file's mtime to
  it, comparing them as unsigned 64-bit numbers, so it is set to the largest value it accepts (see
  `SOURCE_DATE_EPOCH`) to keep per-file mtimes;
- xattrs are put in a fixed order afterwards (`layout.canonicalize_xattr_order`): mkfs.erofs keeps the
  staging file system's `listxattr` order, which differs between ext4 and tmpfs.
Files are stored uncompressed with `-Enoinline_data`, so file data sits in whole blocks that a lazy
reader can fetch on demand, and almost all metadata is separate from it.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
import uuid
from pathlib import Path

from afsd.erofs.layout import canonicalize_xattr_order
from afsd.errors import ConversionError, MissingToolError

# mkfs.erofs 1.5 sets every mtime not below SOURCE_DATE_EPOCH to it, comparing as unsigned 64-bit, so
# a pre-1970 (negative) mtime counts as huge; it rejects 2**64 - 1. Measured: 4_000_000_000 turned 2100
# and 2242 into 2096, 2**63 - 1 turned pre-1970 times into 2**63 - 1 s; 2**64 - 2 keeps every mtime with
# its nanoseconds except [-2 s, 0), which becomes -2 s, and the bytes stay reproducible. The superblock
# build time then reads as -2 s: the kernel uses it only as the mtime of compact inodes, and mkfs.erofs
# 1.5 wrote extended inodes (each with its own mtime) for every file measured, Debian's 6,791 included.
SOURCE_DATE_EPOCH = 2**64 - 2
MKFS_OPTIONS = ("-Enoinline_data",)
_INSTALL_HINT = "install erofs-utils (Debian/Ubuntu: apt-get install erofs-utils)"


def require_tool(name: str) -> str:
    """The path of an erofs-utils program, or `MissingToolError` saying how to install it."""
    path = shutil.which(name)
    if path is None:
        raise MissingToolError(f"{name} not found on PATH: {_INSTALL_HINT}")
    return path


@functools.cache
def erofs_utils_version() -> str:
    """The version of the installed mkfs.erofs (e.g. "1.5"); part of the converter identity."""
    # mkfs.erofs 1.5 has no version flag but prints "mkfs.erofs <version>" before parsing options.
    result = subprocess.run([require_tool("mkfs.erofs"), "--version"], capture_output=True, text=True)
    match = re.search(r"^mkfs\.erofs\s+(\S+)", result.stdout + result.stderr, re.MULTILINE)
    if match is None:
        raise MissingToolError(f"cannot tell the version of mkfs.erofs: {_INSTALL_HINT}")
    return match.group(1)


def max_name_bytes() -> int:
    """The longest file name (bytes) the installed mkfs.erofs can store.

    The erofs format allows 255, but mkfs.erofs 1.5 fails with "No such file or directory" on a
    255-byte name (measured): checking first gives the user a clear error instead.
    """
    return 254 if erofs_utils_version() == "1.5" else 255


def build_image(source: Path, image: Path, *, fs_uuid: uuid.UUID, layer: str) -> None:
    """Write an erofs image of the directory `source` to `image` (overwritten).

    `layer` names the layer in errors. Raises `ConversionError` when mkfs.erofs fails (e.g. disk full).
    """
    command = [require_tool("mkfs.erofs"), *MKFS_OPTIONS, f"-U{fs_uuid}", str(image), str(source)]
    env = {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"), "LC_ALL": "C",
           "SOURCE_DATE_EPOCH": str(SOURCE_DATE_EPOCH)}
    result = subprocess.run(command, capture_output=True, text=True, errors="replace", env=env)
    if result.returncode != 0:
        raise ConversionError(
            f"mkfs.erofs failed for layer {layer} writing {image}: {_last_lines(result)}"
            + (" (the disk is full: free space or point the work directory elsewhere)"
               if "No space left" in result.stdout + result.stderr else "")
        )
    canonicalize_xattr_order(image)


def fsck_erofs(image: Path) -> None:
    """Check an image with fsck.erofs (reading every file); `ConversionError` with its output if bad."""
    result = subprocess.run([require_tool("fsck.erofs"), "--extract", str(image)],
                            capture_output=True, text=True, errors="replace")
    if result.returncode != 0:
        raise ConversionError(f"fsck.erofs rejects {image}: {_last_lines(result)}")


def _last_lines(result: subprocess.CompletedProcess[str], count: int = 3) -> str:
    lines = [line.strip() for line in (result.stderr + result.stdout).splitlines() if line.strip()]
    return " / ".join(lines[-count:]) or f"exit status {result.returncode}"
