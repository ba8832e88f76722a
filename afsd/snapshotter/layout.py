"""Where the snapshotter keeps a snapshot's files, and the mounts containerd gets for a snapshot.

    <root>/metadata.db              the MetaStore (sqlite)
    <root>/empty                    an empty directory: the second lower of a one-layer read-only overlay
    <root>/snapshots/<id>/fs        active or view snapshot: its overlay upper directory; a committed
                                    plain layer: the layer's files (containerd unpacked them there);
                                    a committed lazy layer: a symlink to the node daemon's read-only
                                    erofs mount of the layer
    <root>/snapshots/<id>/work      an active snapshot's overlay work directory
    <root>/snapshots/<id>/fixup     for a committed snapshot whose chain holds lazy layers: the
                                    implicit-directory fixup tree of that chain (afsd.erofs.stack), made
                                    the first time a snapshot is created on top of it; `nofixup` when the
                                    chain needs none

Mounts follow containerd's overlayfs snapshotter: an active snapshot is an overlay with its upper and
work directories over its parents' `fs` (top first), or a bind mount of `fs` when it has no parent;
the fixup, when there is one, is the topmost lower. Every lower sits under `<root>/snapshots`, so
containerd can shorten long lowerdir lists to relative paths (it does so past ~3.5 KiB of options).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from afsd.erofs.stack import LayerTree, build_fixup
from afsd.snapshotter.store import SnapshotArgumentError

_OVERLAY_INDEX_PARAMETER = Path("/sys/module/overlay/parameters/index")


@dataclass(frozen=True)
class MountSpec:
    """One entry of the mounts a snapshotter returns (containerd.types.Mount)."""

    type: str
    source: str
    options: tuple[str, ...]


def check_lower_path(path: str) -> str:
    """`path` if it can stand in overlayfs' lowerdir list (absolute; no ':', ',' or newline, which
    containerd's mount options cannot escape); SnapshotArgumentError otherwise."""
    if not path.startswith("/") or any(c in path for c in ":,\n"):
        raise SnapshotArgumentError(f"{path[:200]!r} cannot be an overlayfs layer path (absolute, without : or ,)")
    return path


class Layout:
    def __init__(self, root: Path) -> None:
        self.root = Path(check_lower_path(str(root)))
        self.snapshots = root / "snapshots"
        self.db_path = root / "metadata.db"
        self.empty = root / "empty"

    def create(self) -> None:
        for directory in (self.root, self.snapshots, self.empty):
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.root, 0o700)

    def dir(self, snapshot_id: int) -> Path:
        return self.snapshots / str(snapshot_id)

    def fs(self, snapshot_id: int) -> Path:
        return self.dir(snapshot_id) / "fs"

    def work(self, snapshot_id: int) -> Path:
        return self.dir(snapshot_id) / "work"

    def fixup(self, snapshot_id: int) -> Path:
        return self.dir(snapshot_id) / "fixup"

    def no_fixup_marker(self, snapshot_id: int) -> Path:
        return self.dir(snapshot_id) / "nofixup"

    def make_dirs(self, snapshot_id: int, *, writable: bool) -> None:
        """A new snapshot's directory with an empty `fs` (and `work` when writable)."""
        self.dir(snapshot_id).mkdir(mode=0o700)
        self.fs(snapshot_id).mkdir(mode=0o755)
        if writable:
            self.work(snapshot_id).mkdir(mode=0o700)

    def point_at_layer(self, snapshot_id: int, mountpoint: Path) -> None:
        """Make `fs` a symlink to the lazy layer's mount (idempotent; replaces an empty `fs` dir)."""
        fs = self.fs(snapshot_id)
        if fs.is_symlink():
            if os.readlink(fs) == str(mountpoint):
                return
        elif fs.is_dir():
            fs.rmdir()                            # empty: a lazy layer never had files of its own here
        shutil.rmtree(self.work(snapshot_id), ignore_errors=True)
        partial = fs.with_name("fs.partial")
        partial.unlink(missing_ok=True)
        partial.symlink_to(mountpoint)
        os.replace(partial, fs)

    def remove(self, snapshot_id: int) -> None:
        """Delete a snapshot's directory (symlinks are removed, never followed)."""
        shutil.rmtree(self.dir(snapshot_id), ignore_errors=True)

    def directory_ids(self) -> set[int]:
        return {int(entry.name) for entry in self.snapshots.iterdir() if entry.name.isdigit()}

    def ensure_fixup(self, top_id: int, layers: Sequence[LayerTree]) -> Path | None:
        """The fixup tree for the chain whose topmost committed snapshot is `top_id` (`layers`: bottom
        first), built once and kept in that snapshot's directory; None when the chain needs none."""
        fixup, marker = self.fixup(top_id), self.no_fixup_marker(top_id)
        if fixup.is_dir():
            return fixup
        if marker.exists():
            return None
        partial = self.dir(top_id) / "fixup.partial"
        shutil.rmtree(partial, ignore_errors=True)
        try:
            built = build_fixup(layers, partial)
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise
        if built is None:
            marker.touch()
            return None
        os.replace(partial, fixup)
        return fixup


def overlay_index_off() -> tuple[str, ...]:
    """("index=off",) when this kernel's overlayfs has the inodes index: layers are shared by many
    overlays, which the index forbids (containerd's overlayfs snapshotter does the same)."""
    return ("index=off",) if _OVERLAY_INDEX_PARAMETER.exists() else ()


def snapshot_mounts(*, writable: bool, fs: Path, work: Path, lowers: Sequence[Path], empty: Path,
                    single_lower_is_plain: bool) -> list[MountSpec]:
    """What containerd mounts for a snapshot (see the module docstring). `lowers`: top first, the
    fixup included; `single_lower_is_plain`: a lone lower is a plain directory (no overlayfs
    whiteouts inside), which a read-only bind mount can show as it is."""
    if not lowers:
        return [MountSpec("bind", str(fs), ("rw" if writable else "ro", "rbind"))]
    if writable:
        options = (*overlay_index_off(), f"workdir={work}", f"upperdir={fs}",
                   "lowerdir=" + ":".join(str(p) for p in lowers))
        return [MountSpec("overlay", "overlay", options)]
    if len(lowers) == 1 and single_lower_is_plain:
        return [MountSpec("bind", str(lowers[0]), ("ro", "rbind"))]
    lowerdirs = [*lowers, empty] if len(lowers) == 1 else list(lowers)
    return [MountSpec("overlay", "overlay", (*overlay_index_off(), "lowerdir=" + ":".join(str(p) for p in lowerdirs)))]
