"""`afsd let --userns`: the user namespace containers run in, and the start-time check that this kernel
can build their root filesystems without copying the image.

Containers' ids 0..size-1 are host ids start..start+size-1 (one range per afslet, like Docker's
userns-remap). Their rootfs is made of idmapped mounts (idmapped.py, rootfs.py): of the erofs layers the
node daemon mounts and of the extra dir on the work dir's file system. `prepare_userns` checks both for
real — an erofs image made with mkfs.erofs and a directory of the work dir, each cloned with the mapping —
and either returns the namespace's fd with the one line afslet logs at start, or refuses to start with
one line saying what the kernel refused (an afslet asked for --userns never runs containers as real root
instead).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from afsd.afslet.bundle import IdMap
from afsd.afslet.idmapped import IdmapError, idmapped_clone, user_namespace_fd
from afsd.erofs.mount import mount_erofs, unmount
from afsd.errors import MountError, UsageError


def _probe(source: Path, scratch: Path, userns_fd: int, what: str) -> None:
    target = scratch / f"idmapped-{source.name}"
    target.mkdir()
    try:
        idmapped_clone(source, target, userns_fd)
    except IdmapError as error:
        raise UsageError(f"--userns: this kernel cannot make idmapped mounts of {what} ({error.strerror}); "
                         "afslet does not start (it never copies or chowns images instead): run it without "
                         "--userns, or on a kernel with idmapped erofs/overlay layers (Linux 6.x)") from None
    unmount(target, detach=True)


def prepare_userns(id_map: IdMap, work_dir: Path) -> tuple[int, str]:
    """The user namespace's fd and the start-up line; UsageError if idmapped mounts are not possible."""
    if id_map.host_start <= 0 or id_map.size <= 0:
        raise UsageError(f"--userns range {id_map.host_start}:{id_map.size}: start and size must be > 0")
    work_dir.mkdir(parents=True, exist_ok=True)
    for directory in (work_dir, work_dir / "sessions"):
        directory.mkdir(exist_ok=True)
        directory.chmod(0o711)
    for ancestor in work_dir.absolute().parents:
        if not ancestor.stat().st_mode & 0o001:
            raise UsageError(f"--userns: container root (host uid {id_map.host_start}) must be able to reach "
                             f"{work_dir}, but {ancestor} is mode {ancestor.stat().st_mode & 0o777:o}: make it "
                             "0711 or use another --work-dir")
    fd = user_namespace_fd(id_map)
    try:
        with tempfile.TemporaryDirectory(prefix="userns-probe-", dir=work_dir) as scratch_name:
            scratch = Path(scratch_name)
            (scratch / "tree").mkdir()
            (scratch / "tree" / "file").write_text("probe\n")
            _probe(scratch / "tree", scratch, fd, f"the work dir's file system ({work_dir})")
            if shutil.which("mkfs.erofs"):
                made = subprocess.run(["mkfs.erofs", str(scratch / "probe.erofs"), str(scratch / "tree")],
                                      capture_output=True, text=True)
                if made.returncode == 0:
                    (scratch / "erofs").mkdir()
                    try:
                        mount_erofs(scratch / "probe.erofs", scratch / "erofs")
                    except MountError as error:
                        raise UsageError(f"--userns: cannot check idmapped erofs mounts: {error}") from None
                    try:
                        _probe(scratch / "erofs", scratch, fd, "erofs layers")
                    finally:
                        unmount(scratch / "erofs", detach=True)
    except BaseException:
        os.close(fd)
        raise
    end = id_map.host_start + id_map.size - 1
    return fd, (f"user namespaces: container uid/gid 0-{id_map.size - 1} are host {id_map.host_start}-{end} "
                f"(container root is host uid {id_map.host_start}, no privilege on the host); rootfs from "
                "idmapped mounts of the shared image layers (erofs) and the extra dir, overlayfs above them "
                "(this kernel cannot idmap an overlay mount itself); the writable layer stores host ids")
