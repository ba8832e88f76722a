"""A session's root filesystem, mounted nosuid,nodev, and with `--userns` idmapped into the containers'
user namespace.

- Without `--userns`: the node daemon's overlay at `<session>/rootfs` (image layers, the extra dir, the
  writable upper `<session>/rw/upper`), whose mount flags afslet then sets to nosuid,nodev: a setuid
  binary of the image gives nobody anything, on the host or in the container.
- With `--userns`: the node daemon mounts the image read-only at `<session>/image` (layers and extra dir,
  no upper); afslet clones each of its lower directories as an idmapped mount (idmapped.py), mounts its
  own overlay over the clones at `<session>/rootfs` with the upper `<session>/rw/upper` (owned by the
  container's root, i.e. host uid `start`), nosuid,nodev, and detaches the clones (the overlay keeps
  private references to its layers). Nothing of the image is copied or chowned.

Either way the writable upper is volatile (overlayfs `volatile`): it is the task's scratch, thrown away
after its tar is sent, so unmounting the rootfs does not sync the node's whole disk (afsd.erofs.mount).

`unmount` undoes whichever it was, and is what teardown and crash recovery call.
"""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path

from afsd.afslet.bundle import IdMap
from afsd.afslet.idmapped import (
    MOUNT_ATTR_NODEV,
    MOUNT_ATTR_NOSUID,
    idmapped_clone,
    overlay_lower_dirs,
    set_mount_attributes,
)
from afsd.afslet.node_mounts import NodeMounts
from afsd.api import node_pb2 as pb
from afsd.erofs.mount import mount_overlay, unmount
from afsd.errors import MountError
from afsd.node.records import mounted_paths

log = logging.getLogger(__name__)


class SessionRootfs:
    def __init__(self, mounts: NodeMounts, session: Path, id_map: IdMap | None = None, userns_fd: int = -1) -> None:
        self.mounts = mounts
        self.session = session
        self.id_map = id_map
        self.userns_fd = userns_fd
        self.idmapped = id_map is not None

    @classmethod
    def leftover(cls, mounts: NodeMounts, session: Path) -> SessionRootfs:
        """The rootfs of a session a crashed afslet left, made either way (for `unmount`)."""
        rootfs = cls(mounts, session)
        rootfs.idmapped = (session / "image").is_dir()
        return rootfs

    @property
    def rootfs(self) -> Path:
        return self.session / "rootfs"

    @property
    def image(self) -> Path:
        """Where the node daemon mounts the image: the rootfs itself, or (userns) the read-only image."""
        return self.session / "image" if self.idmapped else self.rootfs

    @property
    def rw(self) -> Path:
        return self.session / "rw"

    async def mount(self, image: str, platform: str, extra_dir: Path) -> pb.MountInfo:
        if self.id_map is None:
            info = await self.mounts.mount(image, platform, self.rootfs, self.rw, extra_dir)
            await asyncio.to_thread(set_mount_attributes, self.rootfs, MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV)
            return info
        await asyncio.to_thread(self.image.mkdir, exist_ok=True)
        info = await self.mounts.mount(image, platform, self.image, None, extra_dir)
        await asyncio.to_thread(self._mount_idmapped)
        return info

    def _mount_idmapped(self) -> None:
        assert self.id_map is not None
        root = self.id_map.host_start
        upper, work, layers = self.rw / "upper", self.rw / "work", self.session / "layers"
        for directory in (upper, work, layers):
            directory.mkdir(mode=0o755, exist_ok=True)
        os.chown(upper, root, root)  # the image's / belongs to the container's root
        clones: list[Path] = []
        try:
            for index, lower in enumerate(overlay_lower_dirs(self.image)):
                clone = layers / str(index)
                clone.mkdir()
                idmapped_clone(lower, clone, self.userns_fd)
                clones.append(clone)
            mount_overlay(clones, self.rootfs, upper=upper, work=work, volatile=True)   # the task's scratch
            set_mount_attributes(self.rootfs, MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV)
        finally:
            for clone in clones:  # the overlay holds its own references to its layers
                unmount(clone, detach=True)
            for clone in layers.iterdir():
                clone.rmdir()

    async def unmount(self) -> bool:
        """Unmount what `mount` made (also a predecessor's, at recovery); False if something stays mounted."""
        mounted = set(await asyncio.to_thread(mounted_paths))
        ok = True
        if self.image != self.rootfs and str(self.rootfs) in mounted:
            try:
                await asyncio.to_thread(unmount, self.rootfs, detach=True)
            except MountError as error:
                log.error("%s", error)
                ok = False
        if str(self.image) in mounted or self.image == self.rootfs:
            ok = await self.mounts.unmount(self.image) and ok
        return ok
