"""The one interface every kernel backend implements, and choosing a backend for the running kernel.

A backend turns a blob it does not have yet into a mounted, read-only erofs filesystem whose misses
are served on demand: `attach` prepares the blob (for `eager`: fetch it all; for `fanotify`: a sparse
file with its metadata present, marked for pre-content events; for `fscache`: registered with the
cachefiles daemon), `mount` mounts it, `detach` undoes `attach` once nothing uses the blob. Nothing
outside afsd/ondemand/ knows which backend runs (see STYLE.md: small interfaces between big parts).
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from prometheus_client.registry import Collector

from afsd.erofs.mount import mount_erofs
from afsd.errors import AfsdError
from afsd.ondemand.sparse import present_bytes_at
from afsd.ondemand.spec import BlobSpec, RangeSource


class BackendUnavailableError(AfsdError):
    """The requested backend cannot run on this kernel or machine."""


@dataclass
class BlobSource:
    """Where a blob's bytes come from: an in-process source (prefill, eager fetches) and the settings
    from which another process (a fetch worker) can build its own."""

    source: RangeSource
    config: dict[str, Any] = field(default_factory=dict)


class Backend(ABC):
    name: ClassVar[str]

    @classmethod
    @abstractmethod
    def unavailable_reason(cls) -> str | None:
        """None when this backend can run here, else one line saying why not and what to do."""

    async def start(self) -> None:
        """Called once when the node daemon starts (reattach to a supervisor, ...)."""

    async def close(self) -> None:
        """Called when the node daemon stops; mounts stay (they outlive the daemon)."""

    @abstractmethod
    async def attach(self, spec: BlobSpec, blob_path: Path, source: BlobSource) -> None:
        """Make `blob_path` mountable; its misses (if any) are served from `source` from now on."""

    async def mount(self, spec: BlobSpec, blob_path: Path, target: Path) -> None:
        """Mount the attached blob read-only at `target` (file-backed erofs by default)."""
        await asyncio.to_thread(mount_erofs, blob_path, target)

    async def detach(self, spec: BlobSpec, blob_path: Path) -> None:
        """Undo `attach` after the blob's last mount is gone."""

    async def is_complete(self, spec: BlobSpec, blob_path: Path) -> bool:
        """Whether every byte of the blob is on this node (then it can be served to peers)."""
        return await asyncio.to_thread(self.present_bytes, spec, blob_path) >= spec.size

    def present_bytes(self, spec: BlobSpec, blob_path: Path) -> int:
        """How many bytes of the attached blob are on this node (for `afsd mounts`). Blocking: call it
        from a thread. By default the bytes of `blob_path` that are not holes; a backend that keeps them
        elsewhere (fscache: in the cachefiles cache) asks where they are."""
        return present_bytes_at(blob_path, spec.size)

    async def refresh(self) -> object:
        """Update what `counters` reports (e.g. ask a supervisor process for its status)."""
        return None

    def counters(self) -> dict[str, float]:
        """Backend-specific counters for `afsd mounts` and metrics, as of the last `refresh`."""
        return {}

    def metrics_collector(self) -> Collector | None:
        """Prometheus metrics of the processes this backend runs (its supervisor's counters, fed by
        `refresh`), for the node daemon's /metrics; None when there are none."""
        return None

