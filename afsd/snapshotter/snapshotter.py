"""containerd's snapshotter semantics over the MetaStore, the on-disk Layout and the node daemon.

Data flow of a lazily served layer (containerd's CRI plugin pulling an image):
  Prepare(key, parent, labels naming the layer and target name) → an active snapshot is recorded
  with a new lease id → node daemon AttachLayer(lease) mounts the layer's erofs blob on demand →
  `fs` becomes a symlink to that mount → the snapshot is committed under the target name →
  Prepare answers AlreadyExists, which tells containerd the layer is there: it never downloads it.
Anything that goes wrong before the commit (no provider, a media type afsd cannot convert, the node
daemon down) leaves a plain active snapshot: containerd then downloads and unpacks the layer itself.

A container's snapshot (Prepare with the image's top layer as parent) is an overlay of its upper
directory over its parents' `fs` (lazy or plain), with the fixup tree of lazy layers' implicit
directories on top, so the root filesystem is what `umoci unpack` gives (see afsd.erofs.stack).

Nothing here unmounts anything: the overlays belong to containerd, the layer mounts to the node
daemon, so a restart of the snapshotter leaves running containers alone. Remove releases a lazy
snapshot's lease at once; Cleanup removes directories and leases that no snapshot records (left
by a crash between steps).
"""

from __future__ import annotations

import asyncio
import logging
import os
import stat
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path

from prometheus_client import Counter

from afsd.erofs.stack import LayerTree
from afsd.node.records import mounted_paths
from afsd.snapshotter.filters import parse_filters, snapshot_fields
from afsd.snapshotter.layout import Layout, MountSpec, snapshot_mounts
from afsd.snapshotter.lazy import (
    LAZY_LAYER_LABEL,
    TARGET_LABEL,
    LayerSource,
    NodeLayerError,
    NodeLayers,
    layer_source,
)
from afsd.snapshotter.store import (
    Kind,
    LazyLayer,
    MetaStore,
    Snapshot,
    SnapshotExistsError,
    SnapshotNotFoundError,
    SnapshotStateError,
)

log = logging.getLogger(__name__)

LAYERS_PREPARED = Counter("afsd_snapshotter_layers_total",
                          "Image layers containerd asked for, by how they were provided", ["path"])


class Snapshotter:
    def __init__(self, root: Path, node: NodeLayers) -> None:
        self.layout = Layout(root)
        self.node = node
        self.store: MetaStore | None = None
        self._fixup_locks: dict[int, asyncio.Lock] = {}

    @property
    def _store(self) -> MetaStore:
        assert self.store is not None, "Snapshotter.start() first"
        return self.store

    async def start(self) -> None:
        await asyncio.to_thread(self.layout.create)
        self.store = await asyncio.to_thread(MetaStore, self.layout.db_path)
        await self.cleanup()

    async def close(self) -> None:
        if self.store is not None:
            await asyncio.to_thread(self.store.close)
        await self.node.close()

    # -- creating ---------------------------------------------------------------------------------

    async def prepare(self, key: str, parent: str, labels: Mapping[str, str]) -> list[MountSpec]:
        """An active snapshot's mounts; SnapshotExistsError once a layer is served lazily under its target."""
        target, source = labels.get(TARGET_LABEL, ""), layer_source(labels)
        if target and source is not None:
            existing = await self._find(target)
            if existing is not None and existing.kind == Kind.COMMITTED and existing.parent == parent:
                raise SnapshotExistsError(f"target snapshot {target!r} already exists")
            if existing is None:
                snapshot = await self._prepare_lazily(key, parent, labels, target, source)
                return await self._mounts(snapshot, new=True)
        if target:
            if source is None:
                log.info("layer %s comes without the CRI plugin's image labels (not a CRI pull, or containerd's "
                         "disable_snapshot_annotations is true): containerd unpacks it", target)
            LAYERS_PREPARED.labels("fallback").inc()
        snapshot = await self._create(Kind.ACTIVE, key, parent, labels)
        return await self._mounts(snapshot, new=True)

    async def view(self, key: str, parent: str, labels: Mapping[str, str]) -> list[MountSpec]:
        snapshot = await self._create(Kind.VIEW, key, parent, labels)
        return await self._mounts(snapshot)

    async def _create(self, kind: Kind, key: str, parent: str, labels: Mapping[str, str],
                      lazy: LazyLayer | None = None) -> Snapshot:
        snapshot = await asyncio.to_thread(self._store.create, kind, key, parent, labels, lazy)
        try:
            await asyncio.to_thread(self.layout.make_dirs, snapshot.id, writable=kind == Kind.ACTIVE)
        except BaseException:
            await self._forget(snapshot)
            raise
        return snapshot

    async def _prepare_lazily(self, key: str, parent: str, labels: Mapping[str, str], target: str,
                              source: LayerSource) -> Snapshot:
        """Attach the layer and commit it as `target` (raising SnapshotExistsError), or return the
        plain active snapshot containerd is to unpack the layer into."""
        lazy = LazyLayer(self.node.new_lease_id(), source.layer_digest, source.image, source.manifest_digest)
        snapshot = await self._create(Kind.ACTIVE, key, parent, labels, lazy)
        try:
            lease = await self.node.attach(lazy.lease_id, source)
        except NodeLayerError as error:
            log.warning("layer %s of %s is not served lazily (%s): containerd unpacks it", source.layer_digest,
                        source.image, error)
            await asyncio.to_thread(self._store.drop_lazy, snapshot.id)
            await self._release_quietly(lazy.lease_id)   # the attach may have completed after all
            LAYERS_PREPARED.labels("fallback").inc()
            return replace(snapshot, lazy=None)
        lazy = replace(lazy, mountpoint=lease.mountpoint, implicit_dirs=tuple(lease.implicit_dirs), size=lease.size)
        await asyncio.to_thread(self.layout.point_at_layer, snapshot.id, Path(lease.mountpoint))
        try:
            await asyncio.to_thread(self._store.commit, key, target, {**labels, LAZY_LAYER_LABEL: source.layer_digest},
                                    lazy=lazy)
        except SnapshotExistsError:
            await self.remove(key)   # a concurrent Prepare of the same layer committed it first
            raise
        LAYERS_PREPARED.labels("lazy").inc()
        log.info("layer %s of %s served lazily as %s", source.layer_digest, source.image, target)
        raise SnapshotExistsError(f"target snapshot {target!r} is served by afsd")

    # -- mounts -----------------------------------------------------------------------------------

    async def mounts(self, key: str) -> list[MountSpec]:
        snapshot = await asyncio.to_thread(self._store.get, key)
        if snapshot.kind == Kind.COMMITTED:
            raise SnapshotStateError(f"snapshot {key!r} is committed: only active and view snapshots have mounts")
        return await self._mounts(snapshot)

    async def _mounts(self, snapshot: Snapshot, *, new: bool = False) -> list[MountSpec]:
        chain = await asyncio.to_thread(self._store.chain, snapshot)
        chain = await self._ensure_attached(chain)
        lowers = [self.layout.fs(p.id) for p in chain]
        if any(p.lazy for p in chain):
            fixup = await self._fixup(chain)
            if fixup is not None:
                lowers.insert(0, fixup)
        writable = snapshot.kind == Kind.ACTIVE
        if new and writable and lowers:
            await asyncio.to_thread(_copy_root_owner_and_mode, lowers[0], self.layout.fs(snapshot.id))
        return snapshot_mounts(writable=writable, fs=self.layout.fs(snapshot.id), work=self.layout.work(snapshot.id),
                               lowers=lowers, empty=self.layout.empty,
                               single_lower_is_plain=len(chain) == 1 and chain[0].lazy is None)

    async def _ensure_attached(self, chain: Sequence[Snapshot]) -> list[Snapshot]:
        """The chain, with every lazy layer mounted: one the node daemon lost (a reboot) is attached
        again under its lease."""
        if not any(p.lazy for p in chain):
            return list(chain)
        mounted = await asyncio.to_thread(mounted_paths)
        result = []
        for parent in chain:
            lazy = parent.lazy
            if lazy is not None and lazy.mountpoint not in mounted:
                log.warning("layer %s (snapshot %s) is not mounted: attaching it again", lazy.layer_digest, parent.name)
                lease = await self.node.attach(lazy.lease_id, LayerSource(lazy.image, lazy.layer_digest,
                                                                          lazy.manifest_digest))
                lazy = replace(lazy, mountpoint=lease.mountpoint)
                await asyncio.to_thread(self._store.set_lazy, parent.id, lazy)
                await asyncio.to_thread(self.layout.point_at_layer, parent.id, Path(lease.mountpoint))
                parent = replace(parent, lazy=lazy)
            result.append(parent)
        return result

    async def _fixup(self, chain: Sequence[Snapshot]) -> Path | None:
        top = chain[0]
        lock = self._fixup_locks.setdefault(top.id, asyncio.Lock())
        async with lock:
            # The trees are read through the real mounts: the fixup walk never follows symlinks.
            trees = [LayerTree(Path(p.lazy.mountpoint), p.lazy.implicit_dirs) if p.lazy
                     else LayerTree(self.layout.fs(p.id), ()) for p in reversed(chain)]
            return await asyncio.to_thread(self.layout.ensure_fixup, top.id, trees)

    # -- committing and removing -------------------------------------------------------------------

    async def commit(self, name: str, key: str, labels: Mapping[str, str]) -> Snapshot:
        active = await asyncio.to_thread(self._store.get, key)
        size, inodes = await asyncio.to_thread(disk_usage, self.layout.fs(active.id))
        return await asyncio.to_thread(self._store.commit, key, name, labels, size=size, inodes=inodes)

    async def remove(self, key: str) -> None:
        snapshot = await asyncio.to_thread(self._store.remove, key)
        await self._forget(snapshot, recorded=False)

    async def _forget(self, snapshot: Snapshot, *, recorded: bool = True) -> None:
        """Drop what a snapshot owned: its record (if still `recorded`), lease and directory."""
        if recorded:
            await asyncio.to_thread(self._store.remove, snapshot.name)
        self._fixup_locks.pop(snapshot.id, None)
        if snapshot.lazy is not None:
            await self._release_quietly(snapshot.lazy.lease_id)
        await asyncio.to_thread(self.layout.remove, snapshot.id)

    async def _release_quietly(self, lease_id: str) -> None:
        try:
            await self.node.release(lease_id)
        except NodeLayerError as error:
            log.warning("lease %s stays until the next Cleanup: %s", lease_id, error)

    async def cleanup(self) -> None:
        """Remove directories and node leases that no snapshot records (left by crashes). Leases wait
        for a Cleanup that finds the node daemon answering."""
        # Listed before the records are read: a snapshot is recorded before its directory is made and
        # before its lease is asked for, so whatever is listed but not recorded is left over.
        directories = await asyncio.to_thread(self.layout.directory_ids)
        ids = await asyncio.to_thread(self._store.ids)
        for orphan in sorted(directories - ids):
            log.info("cleanup: removing the directory of unknown snapshot %d", orphan)
            await asyncio.to_thread(self.layout.remove, orphan)
        try:
            leases = await self.node.leases()
            known = await asyncio.to_thread(self._store.lease_ids)
            for lease in leases:
                if lease.lease_id not in known:
                    log.info("cleanup: releasing lease %s (layer %s) that no snapshot records", lease.lease_id,
                             lease.layer_digest)
                    await self.node.release(lease.lease_id)
        except NodeLayerError as error:
            log.warning("cleanup: leases not reconciled: %s", error)

    # -- reading ----------------------------------------------------------------------------------

    async def stat(self, key: str) -> Snapshot:
        return await asyncio.to_thread(self._store.get, key)

    async def update(self, name: str, labels: Mapping[str, str], fieldpaths: Sequence[str]) -> Snapshot:
        return await asyncio.to_thread(self._store.update_labels, name, labels, fieldpaths)

    async def list(self, filters: Sequence[str]) -> list[Snapshot]:
        wanted = parse_filters(filters)
        snapshots = await asyncio.to_thread(self._store.all)
        return [s for s in snapshots if wanted.matches(snapshot_fields(s.name, s.parent, s.kind.value, s.labels))]

    async def usage(self, key: str) -> tuple[int, int]:
        """(bytes, inodes): an active snapshot's upper directory as it is now; a committed plain layer
        as it was committed; a lazy layer: the bytes of its blob on this node so far."""
        snapshot = await asyncio.to_thread(self._store.get, key)
        if snapshot.kind == Kind.ACTIVE:
            return await asyncio.to_thread(disk_usage, self.layout.fs(snapshot.id))
        if snapshot.lazy is not None:
            try:
                leases = await self.node.leases(snapshot.lazy.lease_id)
            except NodeLayerError as error:
                log.warning("usage of %s unknown: %s", key, error)
                return 0, 0
            return (leases[0].cached_bytes if leases else 0), 0
        return snapshot.size, snapshot.inodes

    async def _find(self, name: str) -> Snapshot | None:
        try:
            return await asyncio.to_thread(self._store.get, name)
        except SnapshotNotFoundError:
            return None


def disk_usage(root: Path) -> tuple[int, int]:
    """(bytes allocated, inodes) under `root`, each inode counted once, symlinks not followed."""
    top = os.lstat(root)
    seen: set[tuple[int, int]] = {(top.st_dev, top.st_ino)}
    size = top.st_blocks * 512
    pending = [os.fsencode(root)]
    while pending:
        directory = pending.pop()
        with os.scandir(directory) as entries:
            for entry in entries:
                st = entry.stat(follow_symlinks=False)
                if (st.st_dev, st.st_ino) not in seen:
                    seen.add((st.st_dev, st.st_ino))
                    size += st.st_blocks * 512
                if stat.S_ISDIR(st.st_mode):
                    pending.append(entry.path)
    return size, len(seen)


def _copy_root_owner_and_mode(lower_root: Path, upper_root: Path) -> None:
    """Give a new upper directory the owner and mode of the root it covers: overlayfs shows the
    upper's, and the image's root keeps its own."""
    st = os.stat(lower_root)   # follows a lazy layer's symlink to its mount
    os.chown(upper_root, st.st_uid, st.st_gid)
    os.chmod(upper_root, stat.S_IMODE(st.st_mode))
