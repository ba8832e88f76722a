"""The one interface every kernel backend implements, and choosing a backend for the running kernel.

A backend turns a blob it does not have yet into a mounted, read-only erofs filesystem whose misses
are served on demand: `attach` prepares the blob (for `eager`: fetch it all; for `fanotify`: a sparse
file with its metadata present, marked for pre-content events; for `fscache`: registered with the
cachefiles daemon), `mount` mounts it, `detach` undoes `attach` once nothing uses the blob. Nothing
outside afsd/ondemand/ knows which backend runs: the node daemon gets them by name (registry.py) and
hands each its bytes (`BlobSource`); docs/architecture.md shows one miss through each.
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from prometheus_client.registry import Collector

from afsd.erofs.mount import mount_erofs
from afsd.errors import AfsdError
from afsd.ondemand.sources import FILE_SOURCES
from afsd.ondemand.sparse import present_bytes_at
from afsd.ondemand.spec import BlobSpec, RangeSource
from afsd.ondemand.trace import RecordedTrace


class BackendUnavailableError(AfsdError):
    """The requested backend cannot run on this kernel or machine."""


@dataclass
class BlobSource:
    """Where a blob's bytes come from: an in-process source (prefill, eager fetches) and the settings
    from which another process (a fetch worker) can build its own."""

    source: RangeSource
    config: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class StartupTrace:
    """What the node daemon asks a backend to do about a layer's first reads (afsd/ondemand/trace.py): fetch
    the `learned` ranges ((offset, length): what the cluster learned readers read first, in that order) before
    the first miss is answered, at prefetch priority; and record its first reads for `record` seconds."""

    learned: tuple[tuple[int, int], ...] = ()
    record: float = 0.0


NO_STARTUP_TRACE = StartupTrace()


@dataclass(frozen=True)
class BackendOptions:
    """How the node daemon runs a backend."""

    state_dir: Path                  # the backend's own state directory
    prefetch: bool = True            # fill whole blobs in the background, not only what readers touch
    keep_blob_copies: bool = False   # keep each blob as a plain file too, for a local layerstore (fscache)
    sources: str = FILE_SOURCES      # the source factory of fetch workers in other processes (sources.py)
    fetch_workers: int | None = None # fetch worker processes, for backends that have them (None: their default)


class Backend(ABC):
    name: ClassVar[str]
    pushes_completion: ClassVar[bool] = False   # `completed_blobs` says when an attached blob becomes complete

    @classmethod
    def create(cls, options: BackendOptions) -> Backend:
        """The backend as the node daemon runs it."""
        return cls()

    @classmethod
    @abstractmethod
    def unavailable_reason(cls) -> str | None:
        """None when this backend can run here, else one line saying why not and what to do."""

    async def start(self) -> None:
        """Called once when the node daemon starts (reattach to a supervisor, ...)."""

    async def close(self) -> None:
        """Called when the node daemon stops; mounts stay (they outlive the daemon)."""

    @abstractmethod
    async def attach(self, spec: BlobSpec, blob_path: Path, source: BlobSource,
                     startup: StartupTrace = NO_STARTUP_TRACE) -> None:
        """Make `blob_path` mountable; its misses (if any) are served from `source` from now on. A backend
        that sees misses honours `startup`; one that fetches everything at once (eager) ignores it."""

    async def mount(self, spec: BlobSpec, blob_path: Path, target: Path) -> None:
        """Mount the attached blob read-only at `target` (file-backed erofs by default)."""
        await asyncio.to_thread(mount_erofs, blob_path, target)

    async def detach(self, spec: BlobSpec, blob_path: Path) -> None:
        """Undo `attach` after the blob's last mount is gone."""

    async def is_complete(self, spec: BlobSpec, blob_path: Path) -> bool:
        """Whether every byte of the blob is on this node (then it can be served to peers)."""
        return await self.present_bytes(spec, blob_path) >= spec.size

    async def present_bytes(self, spec: BlobSpec, blob_path: Path) -> int:
        """How many bytes of the attached blob are on this node (for `afsd mounts`). By default the bytes
        of `blob_path` that are not holes; a backend that keeps them elsewhere (fscache: in the cachefiles
        cache) asks where they are."""
        return await asyncio.to_thread(present_bytes_at, blob_path, spec.size)

    async def completed_blobs(self) -> AsyncIterator[str]:
        """The names (`BlobSpec.name`) of attached blobs as each becomes complete, pushed by the backend
        (only if `pushes_completion`); ends when the backend cannot say any more (its supervisor went
        away): the caller then checks what it waits for with `is_complete` and asks again."""
        return
        yield

    async def take_trace(self, spec: BlobSpec, *, close: bool = False, detaching: bool = False) -> RecordedTrace | None:
        """The recording of the attached blob's first reads asked for in `attach` (None: none); `close` ends
        its window now; `detaching`: the blob is detached next, so filling the rest of it is no use."""
        return None

    def blob_details(self, spec: BlobSpec) -> dict[str, Any]:
        """What the backend said about the blob at the last `refresh` (learned prefetch: bytes prefetched and
        used, ...); empty when it says nothing."""
        return {}

    async def refresh(self) -> object:
        """Update what `counters` reports (e.g. ask a supervisor process for its status)."""
        return None

    def stopped(self) -> bool:
        """Whether the last `refresh` found the backend's processes shut down (the next attach starts them)."""
        return False

    def counters(self) -> dict[str, float]:
        """Backend-specific counters for `afsd mounts` and metrics, as of the last `refresh`."""
        return {}

    def source_metrics(self) -> dict[str, float]:
        """What the sources of this backend's other processes (fetch workers) counted, summed, as of the
        last `refresh` (the node daemon adds them to its own: afsd/cluster/fetch_metrics.py)."""
        return {}

    def metrics_collector(self) -> Collector | None:
        """Prometheus metrics of the processes this backend runs (its supervisor's counters, fed by
        `refresh`), for the node daemon's /metrics; None when there are none."""
        return None

