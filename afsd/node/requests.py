"""What clients ask the node daemon for (a mount, a leased layer) and how it says no."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from afsd.errors import AfsdError


class MountRequestError(AfsdError):
    """A mount request that cannot be satisfied as asked (bad target, busy mount point, ...)."""


class UnknownMountError(MountRequestError):
    """No mount of this daemon has that target or id."""


@dataclass
class MountOptions:
    image: str
    target: Path
    tag: str = ""
    backend: str = "auto"
    platform: str = ""
    upper_dir: Path | None = None
    tmpfs_upper: bool = False
    tmpfs_upper_bytes: int = 0
    volatile_upper: bool = False     # the upper is a task's scratch: never synced (overlayfs `volatile`)
    extra_dir: Path | None = None


@dataclass(frozen=True)
class LayerAttach:
    """One layer of an image to keep attached under a lease (see afsd.node.leases)."""

    lease_id: str
    image: str
    layer_digest: str
    manifest_digest: str = ""
    backend: str = "auto"
    platform: str = ""
