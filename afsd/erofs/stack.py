"""Stack an image's layer blobs into its root file system, with OCI's metadata for implicit directories.

Data flow: converted blobs, bottom layer first, each with its `BlobInfo.implicit_dirs` ->
`mount.mount_erofs` (one read-only mount per layer) -> `build_fixup` -> `mount.mount_overlay` (an optional
extra directory, the fixup, then the layers top first) -> the image's root file system.

Why a fixup: a layer tar may write `srv/app/new.txt` without an entry for `srv/app`. OCI extraction
keeps the metadata `srv/app` already has (the tar is "extracted like a regular tar archive"; umoci and
containerd do the same), but the layer's blob can only hold the directory with defaults (0755
root:root): a blob is converted from its layer alone. overlayfs takes a merged directory's attributes
from the topmost layer that has it, so those defaults would win. `build_fixup` works out, per OCI
application order, the metadata each such directory really has and writes it into a small tree of
empty directories that goes above all layers: overlayfs then takes the attributes from the fixup and
still merges the contents of every layer below it (the fixup holds no whiteouts and no opaque marks).

The rule for a directory D whose topmost layer holds it only implicitly: walk down the layers from
there. The first layer holding D explicitly (a tar entry of its own) supplies mode, owner, xattrs
(without overlayfs' own `trusted.overlay.*`) and mtime; another implicit D continues the walk. A
whiteout or non-directory at D or above it, or an opaque directory above D (in a layer that does not
hold D explicitly), removed the lower copies before D was made again: D gets the defaults of
`unpack` (0755, root:root, no xattrs, `SYNTHESIZED_MTIME_NS`), which is also what it gets when no layer
holds it explicitly. The fixup's directories above D carry their own effective metadata by the same
rule, so the fixup never changes what a directory would show without it.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import stat
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from afsd.erofs.mount import mount_erofs, mount_overlay, unmount
from afsd.erofs.unpack import OVERLAY_OPAQUE_XATTR, OVERLAY_XATTR_PREFIX, SYNTHESIZED_MTIME_NS, decode_dir_path
from afsd.errors import MountError

log = logging.getLogger(__name__)

_Parts = tuple[bytes, ...]


@dataclass(frozen=True)
class StackLayer:
    """One image layer to mount: its erofs blob and its `BlobInfo.implicit_dirs`."""

    blob_path: Path
    implicit_dirs: Collection[str]


@dataclass(frozen=True)
class LayerTree:
    """One layer as a directory tree (normally its mounted blob) and its `BlobInfo.implicit_dirs`."""

    root: Path
    implicit_dirs: Collection[str]


@dataclass(frozen=True)
class DirMetadata:
    """What a directory of the image shows: permission and special bits, owner, xattrs, mtime."""

    mode: int
    uid: int
    gid: int
    mtime_ns: int
    xattrs: tuple[tuple[str, bytes], ...] = ()


# What `unpack` gives a directory the tar does not list.
DEFAULT_DIR_METADATA = DirMetadata(mode=0o755, uid=0, gid=0, mtime_ns=SYNTHESIZED_MTIME_NS)


@contextlib.contextmanager
def mount_image_stack(layers: Sequence[StackLayer], target: Path, *, scratch: Path,
                      extra_dir: Path | None = None, upper: Path | None = None,
                      work: Path | None = None) -> Iterator[Path]:
    """Mount an image's layers (bottom layer first) as one overlayfs at `target`, and yield `target`.

    Each blob is mounted read-only under `scratch` (created if missing); when some implicit directory
    needs its metadata restored, the fixup tree is built in `scratch/fixup` and goes above the layers.
    `extra_dir`, if given, is a read-only directory stacked above everything else (it wins over the
    image). With `upper` and `work` the overlay is writable; without them it is read-only.

    Everything mounted or created under `scratch` is unmounted and removed on exit, also when the body
    or a later step fails. Raises `MountError` naming what could not be mounted or built.
    """
    if not layers:
        raise ValueError("mount_image_stack needs at least one layer")
    with contextlib.ExitStack() as cleanup:
        trees = []
        for index, layer in enumerate(layers):
            point = scratch / f"layer-{index}"
            point.mkdir(parents=True)
            cleanup.callback(point.rmdir)
            mount_erofs(layer.blob_path, point)
            cleanup.callback(unmount, point, detach=True)
            trees.append(LayerTree(point, layer.implicit_dirs))
        cleanup.callback(remove_stack_scratch, scratch)
        stack_layer_trees(trees, target, scratch=scratch, extra_dir=extra_dir, upper=upper, work=work)
        cleanup.callback(unmount, target, detach=True)
        yield target


def stack_layer_trees(trees: Sequence[LayerTree], target: Path, *, scratch: Path, extra_dir: Path | None = None,
                      upper: Path | None = None, work: Path | None = None, volatile: bool = False) -> None:
    """Mount the overlayfs of already mounted layers (bottom first) at `target` (`volatile`: see
    `mount_overlay`).

    The fixup tree (if one is needed) and, for a lone read-only layer, an empty second lower are
    created under `scratch`; `remove_stack_scratch(scratch)` removes them after `target` is unmounted.
    """
    fixup = build_fixup(trees, scratch / "fixup")
    lowers = [tree.root for tree in reversed(trees)]
    if fixup is not None:
        lowers.insert(0, fixup)
    if extra_dir is not None:
        lowers.insert(0, extra_dir)
    if len(lowers) == 1 and upper is None:
        # overlayfs needs two lower directories without an upper one (and without overlayfs the
        # layer's whiteouts would show as character devices).
        empty = scratch / "empty-layer"
        empty.mkdir(parents=True, exist_ok=True)
        lowers.append(empty)
    try:
        mount_overlay(lowers, target, upper=upper, work=work, volatile=volatile)
    except BaseException:
        remove_stack_scratch(scratch)
        raise


def remove_stack_scratch(scratch: Path) -> None:
    """Remove what `stack_layer_trees` created under `scratch` (not `scratch` itself)."""
    _remove_tree(scratch / "fixup")
    try:
        (scratch / "empty-layer").rmdir()
    except FileNotFoundError:
        pass


def build_fixup(layers: Sequence[LayerTree], dest: Path) -> Path | None:
    """Write the fixup tree for `layers` (bottom layer first) into the new directory `dest`.

    Returns `dest`, or None (and creates nothing) when every directory already shows its effective
    metadata. `dest` must be on a file system that holds the layers' xattrs (ext4, xfs, tmpfs);
    otherwise `MountError` names the xattr, and the partial tree is left for the caller to remove.
    """
    views = [_LayerView(layer) for layer in layers]
    candidates = set().union(*(view.implicit for view in views))
    wanted: dict[_Parts, DirMetadata] = {}
    for parts in sorted(candidates):
        resolved = _resolve(views, parts)
        if resolved is not None and resolved.from_implicit and resolved.metadata != DEFAULT_DIR_METADATA:
            wanted[parts] = resolved.metadata
    if not wanted:
        return None
    for parts in list(wanted):
        for depth in range(len(parts)):
            ancestor = parts[:depth]
            if ancestor not in wanted:
                resolved = _resolve(views, ancestor)
                # A visible directory's ancestors are visible directories.
                assert resolved is not None, f"{ancestor!r} of {parts!r} is not a directory of the image"
                wanted[ancestor] = resolved.metadata
    log.debug("fixup for %d implicit director%s in %s", len(wanted), "y" if len(wanted) == 1 else "ies", dest)

    dest.mkdir()
    root = os.fsencode(dest)
    for parts in sorted(wanted, key=len):
        if parts:
            os.mkdir(os.path.join(root, *parts), 0o700)
    # Deepest first: creating a directory changes its parent's mtime.
    for parts in sorted(wanted, key=len, reverse=True):
        _apply(os.path.join(root, *parts), wanted[parts])
    return dest


@dataclass(frozen=True)
class _Resolution:
    from_implicit: bool  # the topmost layer holding the directory holds it only implicitly
    metadata: DirMetadata  # what the directory shows in the image


def _resolve(views: Sequence[_LayerView], parts: _Parts) -> _Resolution | None:
    """The effective metadata of directory `parts` (see module doc); None if it is no directory of the image."""
    implicit_above = False
    for view in reversed(views):
        st, hidden = view.locate(parts)
        if st is not None and stat.S_ISDIR(st.st_mode):
            if parts not in view.implicit:
                return _Resolution(implicit_above, view.metadata(parts, st))
            implicit_above = True
            if hidden:
                break  # this layer made it anew below an opaque directory
        elif st is not None or hidden:
            break  # a whiteout or non-directory here, or it lies below one or below an opaque directory
    return _Resolution(True, DEFAULT_DIR_METADATA) if implicit_above else None


class _LayerView:
    """Cached lookups in one layer's tree that never follow a symlink (layers hold absolute ones)."""

    def __init__(self, layer: LayerTree) -> None:
        self.root = os.fsencode(layer.root)
        self.implicit = {decode_dir_path(path) for path in layer.implicit_dirs}
        self._stats: dict[_Parts, os.stat_result | None] = {}
        self._opaque: dict[_Parts, bool] = {}

    def path(self, parts: _Parts) -> bytes:
        return os.path.join(self.root, *parts)

    def locate(self, parts: _Parts) -> tuple[os.stat_result | None, bool]:
        """(`parts`' lstat here or None, whether a whiteout, non-directory or opaque directory above
        it here hides the lower layers' copies). Ancestors are checked first, so no lstat goes
        through a symlink."""
        hidden = False
        for depth in range(len(parts)):
            ancestor = parts[:depth]
            st = self._lstat(ancestor)
            if st is None:
                return None, hidden
            if not stat.S_ISDIR(st.st_mode):
                return None, True
            hidden = hidden or self._is_opaque(ancestor)
        return self._lstat(parts), hidden

    def metadata(self, parts: _Parts, st: os.stat_result) -> DirMetadata:
        path = self.path(parts)
        names = sorted(name for name in os.listxattr(path, follow_symlinks=False)
                       if not name.startswith(OVERLAY_XATTR_PREFIX))
        xattrs = tuple((name, os.getxattr(path, name, follow_symlinks=False)) for name in names)
        return DirMetadata(mode=stat.S_IMODE(st.st_mode), uid=st.st_uid, gid=st.st_gid,
                           mtime_ns=st.st_mtime_ns, xattrs=xattrs)

    def _lstat(self, parts: _Parts) -> os.stat_result | None:
        if parts not in self._stats:
            try:
                self._stats[parts] = os.lstat(self.path(parts))
            except FileNotFoundError:
                self._stats[parts] = None
        return self._stats[parts]

    def _is_opaque(self, parts: _Parts) -> bool:
        if parts not in self._opaque:
            try:
                value = os.getxattr(self.path(parts), OVERLAY_OPAQUE_XATTR, follow_symlinks=False)
            except OSError as e:
                if e.errno != errno.ENODATA:
                    raise
                value = b""
            self._opaque[parts] = value == b"y"
        return self._opaque[parts]


def _apply(path: bytes, metadata: DirMetadata) -> None:
    # chown may clear special bits: chown, then chmod, then xattrs, then the mtime.
    os.chown(path, metadata.uid, metadata.gid, follow_symlinks=False)
    os.chmod(path, metadata.mode)
    for name, value in metadata.xattrs:
        try:
            os.setxattr(path, name, value, follow_symlinks=False)
        except OSError as e:
            raise MountError(
                f"cannot set xattr {name!r} on {os.fsdecode(path)} for the image's directory metadata: "
                f"{e.strerror}; put the scratch directory on ext4, xfs or tmpfs"
            ) from None
    os.utime(path, ns=(metadata.mtime_ns, metadata.mtime_ns), follow_symlinks=False)


def _remove_tree(path: Path) -> None:
    if path.exists():
        shutil.rmtree(path)
