"""`FscacheBackend`: erofs blobs mounted in fscache mode, their misses served by afsd's cachefiles
daemon, behind the common on-demand interface (afsd.ondemand.base.Backend), for the node daemon.

attach = register the blob (spec + source configuration + `blob_path` as its copy) with the supervisor;
mount = `mount -t erofs none TARGET -o fsid=<blob name>[,domain_id=D]` from a node daemon thread; detach =
unregister and remove the copy. The blob's bytes live in the cachefiles cache directory, which only the
kernel can read; the worker also writes each verified byte into a plain sparse file at `blob_path` (the
copy), which is what the node daemon hands to its local layerstore once `is_complete` says so.
`present_bytes` counts the cache's bytes (it asks the supervisor). What the two supervised backends share
(start, status, counters, metrics, completeness): supervised/backend.py.
"""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path

from afsd.errors import AfsdError
from afsd.ondemand.base import NO_STARTUP_TRACE, BackendOptions, BlobSource, StartupTrace
from afsd.ondemand.cachefiles.client import FscacheClient
from afsd.ondemand.cachefiles.device import kernel_problem
from afsd.ondemand.cachefiles.metrics import StatusCollector
from afsd.ondemand.cachefiles.mount import mount_fscache
from afsd.ondemand.cachefiles.settings import Settings
from afsd.ondemand.sparse import present_bytes_at
from afsd.ondemand.spec import BlobSpec
from afsd.ondemand.supervised.backend import SupervisedBackend

log = logging.getLogger(__name__)


class FscacheBackend(SupervisedBackend):
    name = "fscache"
    collector = StatusCollector
    gauges = ("open_objects",)
    client: FscacheClient

    def __init__(self, state_dir: Path, *, cache_dir: Path | None = None, domain_id: str = "",
                 prefetch: bool = True, copy_blobs: bool = False, settings: Settings | None = None,
                 metrics_listen: str | None = None) -> None:
        """`state_dir` holds the supervisor's socket, log and (by default) the cache directory, which must be
        on ext4, xfs or btrfs. With `domain_id`, every mount joins that erofs share domain (one fscache volume
        for all blobs; a blob used as a `device=` by several images is then opened and cached once).
        With `copy_blobs`, every blob is also kept as a plain file at its `blob_path`, so a node with a
        local layerstore can hand complete blobs to it (the node daemon turns it on only then: it costs
        the blob's size on disk a second time). Without it, `is_complete` means the cache alone."""
        super().__init__(FscacheClient(state_dir, cache_dir=cache_dir, settings=settings,
                                       metrics_listen=metrics_listen))
        self.domain_id = domain_id
        self.prefetch = prefetch
        self.copy_blobs = copy_blobs

    @classmethod
    def create(cls, options: BackendOptions) -> FscacheBackend:
        return cls(options.state_dir, prefetch=options.prefetch, copy_blobs=options.keep_blob_copies,
                   settings=Settings(sources=options.sources))

    @classmethod
    def unavailable_reason(cls) -> str | None:
        if os.geteuid() != 0:
            return "the fscache backend needs root (/dev/cachefiles and erofs mounts need CAP_SYS_ADMIN)"
        return kernel_problem()

    async def attach(self, spec: BlobSpec, blob_path: Path, source: BlobSource,
                     startup: StartupTrace = NO_STARTUP_TRACE) -> None:
        await self._require_supervisor(spec)
        await self.client.register(spec, source.config, prefetch=self.prefetch,
                                   copy_path=await asyncio.to_thread(self._copy_path, spec, blob_path),
                                   learned=startup.learned, record=startup.record)

    def _copy_path(self, spec: BlobSpec, blob_path: Path) -> Path | None:
        """Where the worker keeps the blob's copy: `blob_path` when its directory exists (the node daemon's
        state directory always has it); else none, said here once instead of at every write that fails."""
        if not self.copy_blobs:
            return None
        if not blob_path.parent.is_dir():
            log.warning("layer %s: keeping no copy of its blob (%s does not exist): this node cannot hand it to "
                        "its layerstore", spec.layer_digest, blob_path.parent)
            return None
        return blob_path

    async def mount(self, spec: BlobSpec, blob_path: Path, target: Path) -> None:
        # In a thread: mount(2) waits for the worker to answer the blob's OPEN.
        await asyncio.to_thread(mount_fscache, spec.name, target, domain_id=self.domain_id)

    async def detach(self, spec: BlobSpec, blob_path: Path) -> None:
        await super().detach(spec, blob_path)
        if self.copy_blobs:   # (a layerstore that imported it keeps its own link)
            await asyncio.to_thread(blob_path.unlink, missing_ok=True)

    async def is_complete(self, spec: BlobSpec, blob_path: Path) -> bool:
        """Whether the cache file holds the whole blob (the worker checks with SEEK_HOLE) and, when the blob
        is registered with a copy, so does the copy (the node daemon may import it; the layerstore verifies
        it then). False while the supervisor does not serve the blob."""
        blob = await self.client.blob_status(spec.name)
        if blob is None or not blob.complete:
            return False
        # The copy's own bytes, too: its worker may have stopped before it could say the copy is whole.
        return blob.ready or await asyncio.to_thread(present_bytes_at, Path(blob.path), spec.size) >= spec.size

    async def present_bytes(self, spec: BlobSpec, blob_path: Path) -> int:
        """The blob's bytes in its cache file, as the supervisor's status counts them (its worker walks the
        object's anon fd with SEEK_DATA); 0 when the supervisor cannot say."""
        try:
            blob = await self.client.blob_status(spec.name)
        except AfsdError as e:
            log.warning("no status from the fscache supervisor: %s", e)
            return 0
        return (blob.present_bytes or 0) if blob is not None else 0
