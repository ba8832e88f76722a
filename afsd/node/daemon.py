"""The node daemon's core: mounting images as overlayfs over on-demand erofs layers, and keeping them.

Data flow of a mount: image reference → ImageLocator (discovery + layerstores) → one BlobSpec per layer
→ per layer, shared by every mount that uses it: backend.attach (blob file) + backend.mount (a read-only
erofs at <state>/layers/<hex>) → fixup tree + optional extra dir + optional writable upper →
overlayfs at the target; each layer's backend fetches what the cluster learned tasks read first from it,
and records what readers here read first (traces.py). Records on disk let a restarted daemon adopt what is
mounted, or clean up what is half done: no mount is leaked either way. A layer whose blob becomes complete
on this node is handed to the local layerstore, which then advertises this node as a provider
(handover.py). docs/node.md tells the whole story.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import time
import uuid
import weakref
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from prometheus_client import Counter, Gauge
from prometheus_client.registry import Collector

from afsd import phases
from afsd.erofs.mount import mount_tmpfs, unmount
from afsd.erofs.stack import LayerTree, remove_stack_scratch, stack_layer_trees
from afsd.errors import AfsdError
from afsd.node.concurrently import acquire_all, release_all
from afsd.node.handover import HandOver
from afsd.node.images import ImageLocator
from afsd.node.leases import LeaseBook, LeaseRecord, LeaseRequestError, check_lease_id
from afsd.node.records import MountRecord, StateDir, mounted_paths
from afsd.node.requests import LayerAttach, MountOptions, MountRequestError, UnknownMountError
from afsd.node.traces import LearnedTraces
from afsd.oci.digest import parse_digest
from afsd.oci.platform import parse_platform
from afsd.oci.reference import parse_reference
from afsd.ondemand.base import NO_STARTUP_TRACE, Backend, BackendUnavailableError, BlobSource, StartupTrace
from afsd.ondemand.registry import BACKEND_NAMES
from afsd.ondemand.spec import BlobSpec

log = logging.getLogger(__name__)

MOUNTS = Gauge("afsd_node_mounts", "Image mounts held by the node daemon", ["backend"])
MOUNT_SECONDS = Counter("afsd_node_mount_seconds_total", "Time spent mounting images")
MOUNT_FAILURES = Counter("afsd_node_mount_failures_total", "Mount requests that failed")
LAYER_LEASES = Gauge("afsd_node_layer_leases", "Single layers held for clients that stack them (afsd snapshotter)")

BACKEND_STATUS_PERIOD = 5.0   # how fresh the backends' own metrics on the node's /metrics are


@dataclass
class LayerUse:
    spec: BlobSpec
    backend: Backend
    blob_path: Path
    mountpoint: Path
    refs: int = 0
    imported: bool = False
    importing: bool = False                       # a hand-over to the local layerstore is under way
    lingering: asyncio.Task[None] | None = None   # released by its last mount, kept for `layer_linger` s
    manifest_digest: str = ""                     # the image of the mount that attached it
    learned_ranges: int = 0                       # ranges of the learned trace it was attached with
    recording: asyncio.Task[None] | None = None   # reports its first reads once their window is over


SourceFactory = Callable[[BlobSpec], BlobSource]


class NodeDaemon:
    def __init__(self, state_dir: Path, *, locator: ImageLocator, backends: dict[str, Backend],
                 source_factory: SourceFactory, layerstore_admin_socket: Path | None = None,
                 layer_linger: float = 0.0, traces: LearnedTraces | None = None) -> None:
        """`layer_linger`: seconds a layer stays attached and mounted after its last image mount is gone,
        so the next mount of an image sharing it starts at once, its background fill goes on and, once
        complete, it is handed to the local layerstore (nodes that only run short tasks still spread).
        `traces`: learned prefetch (None: layers are attached without, and nothing is recorded)."""
        self.state = StateDir(state_dir)
        self.layer_linger = layer_linger
        self.locator = locator
        self.backends = backends
        self.source_factory = source_factory
        self.layerstore_admin_socket = layerstore_admin_socket
        self.traces = traces
        self._records: dict[str, MountRecord] = {}
        self._layers: dict[str, LayerUse] = {}
        self.hand_over = (None if layerstore_admin_socket is None else
                          HandOver(layerstore_admin_socket, self._layers, self._in_background))
        self._layer_locks: dict[str, asyncio.Lock] = {}
        self._background: set[asyncio.Task[None]] = set()   # watchers of pushes, hand-overs, retries
        self._status_poller: asyncio.Task[None] | None = None
        self._closing = False
        self._unavailable: dict[str, str | None] = {}  # backend -> why it cannot run (probed once)
        self.lease_book = LeaseBook(state_dir)
        self._leases: dict[str, LeaseRecord] = {}
        self._live_leases: set[str] = set()            # leases holding a reference on their layer
        self._lease_locks: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()

    # -- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        await asyncio.to_thread(self.state.create)
        await asyncio.to_thread(self.lease_book.create)
        for name, backend in self.backends.items():
            self._unavailable[name] = await asyncio.to_thread(backend.unavailable_reason)
            if self._unavailable[name] is None:
                await backend.start()
        await self._restore()
        if self.hand_over is not None:
            for name, backend in self.backends.items():
                if self.available(name) and backend.pushes_completion:
                    self._in_background(self.hand_over.watch(backend))
            for use in list(self._layers.values()):   # adopted: they may have completed while we were away
                self._in_background(self.hand_over.if_complete(use))

    async def close(self) -> None:
        """Stop serving requests. Mounts stay: they outlive the daemon and are adopted at restart."""
        self._closing = True
        for task in [*self._background, self._status_poller]:
            if task:
                task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        lingering = [u for u in self._layers.values() if u.lingering is not None]
        for use in lingering:
            use.lingering.cancel()     # lingering layers have no mount record: release them now
        await release_all([self._drop_layer(use) for use in lingering], "dropping a lingering layer")
        if self.traces is not None:    # what was recorded reaches discovery (within a grace period)
            await self.traces.close()
        for name, backend in self.backends.items():
            if self._unavailable.get(name) is None:
                await backend.close()

    def available(self, name: str) -> bool:
        return name in self.backends and self._unavailable.get(name) is None

    def backend_availability(self) -> dict[str, str]:
        """Each backend's state for `afsd mounts`: why it cannot run, or whether its processes were found
        shut down at its last refresh (a mount still chooses it, and starts them)."""
        return {name: self._unavailable.get(name) or ("stopped (the next mount starts it)" if backend.stopped()
                                                      else "available")
                for name, backend in self.backends.items()}

    def choose_backend(self, name: str) -> Backend:
        if name in ("", "auto"):
            for candidate in BACKEND_NAMES:
                if self.available(candidate):
                    return self.backends[candidate]
            raise BackendUnavailableError("no on-demand backend can run on this node: "
                                          + "; ".join(f"{n}: {r}" for n, r in self.backend_availability().items()))
        backend = self.backends.get(name)
        if backend is None:
            raise BackendUnavailableError(f"unknown backend {name!r}: choose one of auto, "
                                          + ", ".join(BACKEND_NAMES))
        if not self.available(name):
            raise BackendUnavailableError(f"backend {name} is not available on this node: {self._unavailable[name]}")
        return backend

    # -- mounting -------------------------------------------------------------------------------

    async def mount(self, options: MountOptions) -> MountRecord:
        started = time.monotonic()
        try:
            with phases.recording() as timeline:
                record = await self._mount(options)
        except BaseException:
            MOUNT_FAILURES.inc()
            raise
        MOUNT_SECONDS.inc(time.monotonic() - started)
        log.info("mount of %s, ms by phase: %s", record.image, timeline.summary())
        return record

    async def _mount(self, options: MountOptions) -> MountRecord:
        target = await asyncio.to_thread(self._check_target, options.target)
        reference = parse_reference(options.image, options.tag or None)
        platform = parse_platform(options.platform or None)
        backend = self.choose_backend(options.backend)
        for directory, what in ((options.extra_dir, "--extra-dir"), (options.upper_dir, "--upper")):
            if directory is not None and not await asyncio.to_thread(Path(directory).is_dir):
                raise MountRequestError(f"{what} {directory} is not a directory")
        with phases.phase("locate"):
            resolved = await self.locator.locate(reference, platform)
        with phases.phase("traces"):
            learned = await self.traces.learned(resolved.manifest_digest, resolved.layers) if self.traces else {}
        record = MountRecord(mount_id=uuid.uuid4().hex[:12], image=str(reference), image_key=resolved.key,
                             manifest_digest=resolved.manifest_digest, target=str(target), backend=backend.name,
                             created_unix=int(time.time()), layers=resolved.layers,
                             extra_dir=str(options.extra_dir or ""))
        async with contextlib.AsyncExitStack() as undo:
            await asyncio.to_thread(self.state.save, record)
            undo.push_async_callback(asyncio.to_thread, self.state.forget, record)
            uses = await acquire_all(
                [self._acquire_layer(spec, backend, resolved.manifest_digest, learned.get(spec.layer_digest, ()))
                 for spec in resolved.layers], lambda index: self._release_layer(resolved.layers[index].layer_digest),
                undo)
            record.layer_backends.update((spec.layer_digest, use.backend.name) for spec, use in zip(resolved.layers, uses))
            scratch = self.state.scratch(record.mount_id)
            await asyncio.to_thread(scratch.mkdir, parents=True, exist_ok=True)
            undo.push_async_callback(asyncio.to_thread, shutil.rmtree, scratch, True)
            await self._prepare_upper(record, options, scratch, undo)
            await asyncio.to_thread(self.state.save, record)
            trees = [LayerTree(use.mountpoint, spec.implicit_dirs) for use, spec in zip(uses, resolved.layers)]
            with phases.phase("stack"):
                await asyncio.to_thread(
                    stack_layer_trees, trees, target, scratch=scratch, extra_dir=options.extra_dir,
                    upper=Path(record.upper_path) if record.upper_path else None,
                    work=Path(record.work_path) if record.work_path else None, volatile=options.volatile_upper)
            record.state = "mounted"
            await asyncio.to_thread(self.state.save, record)
            undo.pop_all()
        self._records[record.mount_id] = record
        MOUNTS.labels(backend.name).inc()
        log.info("mounted %s at %s (%s, %d layers)", record.image, target, backend.name, len(uses))
        return record

    def _check_target(self, target: Path) -> Path:
        target = Path(os.path.abspath(target))
        if not target.is_dir():
            raise MountRequestError(f"mount point {target} is not an existing directory")
        if str(target) in mounted_paths():
            raise MountRequestError(f"mount point {target} is in use (something is mounted there)")
        if any(target.iterdir()):
            raise MountRequestError(f"mount point {target} is not empty")
        if any(r.target == str(target) for r in self._records.values()):
            raise MountRequestError(f"mount point {target} is being mounted by another request")
        return target

    async def _prepare_upper(self, record: MountRecord, options: MountOptions, scratch: Path,
                             undo: contextlib.AsyncExitStack) -> None:
        if options.tmpfs_upper:
            tmpfs = scratch / "upper-tmpfs"
            await asyncio.to_thread(tmpfs.mkdir)
            await asyncio.to_thread(mount_tmpfs, tmpfs, options.tmpfs_upper_bytes)
            undo.push_async_callback(asyncio.to_thread, unmount, tmpfs, detach=True)
            record.upper, record.tmpfs_path = "tmpfs", str(tmpfs)
            base = tmpfs
        elif options.upper_dir is not None:
            base = Path(os.path.abspath(options.upper_dir))
            record.upper = str(base)
        else:
            return
        for name in ("upper", "work"):
            await asyncio.to_thread((base / name).mkdir, exist_ok=True)
        record.upper_path, record.work_path = str(base / "upper"), str(base / "work")

    async def unmount(self, target_or_id: str) -> MountRecord:
        record = self._find(target_or_id)
        with phases.recording() as timeline:
            await self._teardown(record)
        log.info("unmount of %s, ms by phase (summed over layers): %s", record.image, timeline.summary())
        return record

    def _find(self, target_or_id: str) -> MountRecord:
        wanted = os.path.abspath(target_or_id) if "/" in target_or_id else target_or_id
        for record in self._records.values():
            if record.mount_id == target_or_id or record.target == wanted:
                return record
        raise UnknownMountError(f"no afsd mount at {target_or_id}")

    async def _teardown(self, record: MountRecord) -> None:
        """Unmount the overlay, its tmpfs upper and (when unused) its layers; forget the record."""
        mounted = await asyncio.to_thread(mounted_paths)
        if record.target in mounted:
            with phases.phase("overlay"):
                await asyncio.to_thread(unmount, Path(record.target), detach=True)
        scratch = self.state.scratch(record.mount_id)
        if record.tmpfs_path and record.tmpfs_path in mounted:
            await asyncio.to_thread(unmount, Path(record.tmpfs_path), detach=True)
        await asyncio.to_thread(remove_stack_scratch, scratch)
        await asyncio.to_thread(shutil.rmtree, scratch, True)
        await release_all([self._release_layer(spec.layer_digest) for spec in record.layers
                           if spec.layer_digest in self._layers], f"releasing a layer of {record.image}")
        await asyncio.to_thread(self.state.forget, record)
        if self._records.pop(record.mount_id, None) is not None:
            MOUNTS.labels(record.backend).dec()
        log.info("unmounted %s from %s", record.image, record.target)

    def mounts(self) -> list[MountRecord]:
        return sorted(self._records.values(), key=lambda r: r.created_unix)

    async def layer_state(self, spec: BlobSpec) -> tuple[int, str, dict[str, int]]:
        """(bytes of the blob present on this node, backend that attached it, its learned prefetch: the
        trace's ranges and, as the backend last said, learned_prefetched_bytes and learned_used_bytes)."""
        use = self._layers.get(spec.layer_digest)
        if use is None:
            return 0, "", {}
        details = use.backend.blob_details(spec)
        learned = {key: int(details[key]) for key in ("learned_prefetched_bytes", "learned_used_bytes")
                   if key in details}
        return (await use.backend.present_bytes(spec, use.blob_path), use.backend.name,
                {**learned, "learned_ranges": use.learned_ranges})

    # -- shared layers --------------------------------------------------------------------------

    async def _acquire_layer(self, spec: BlobSpec, backend: Backend, manifest_digest: str = "",
                             learned: tuple[tuple[int, int], ...] = ()) -> LayerUse:
        lock = self._layer_locks.setdefault(spec.layer_digest, asyncio.Lock())
        async with lock:
            use = self._layers.get(spec.layer_digest)
            if use is None:
                use = LayerUse(spec, backend, self.state.blob_path(spec), self.state.layer_mountpoint(spec),
                               manifest_digest=manifest_digest, learned_ranges=len(learned))
                await self._attach_and_mount(use, self.traces.startup(learned) if self.traces else NO_STARTUP_TRACE)
                self._layers[spec.layer_digest] = use
                if self.traces is not None and self.traces.settings.enabled:
                    use.recording = self.traces.follow_in_background(backend, spec, manifest_digest)
                if self.hand_over is not None:   # complete already (eager; a blob kept whole)
                    self._in_background(self.hand_over.if_complete(use))
            if use.lingering is not None:   # wanted again before its linger ran out
                use.lingering.cancel()
                use.lingering = None
            use.refs += 1
            return use

    async def _attach_and_mount(self, use: LayerUse, startup: StartupTrace = NO_STARTUP_TRACE) -> None:
        source = self.source_factory(use.spec)
        try:
            with phases.phase("attach"):
                await use.backend.attach(use.spec, use.blob_path, source, startup)
        finally:
            with phases.phase("attach.close"):
                await source.source.close()
        await asyncio.to_thread(use.mountpoint.mkdir, parents=True, exist_ok=True)
        try:
            with phases.phase("erofs"):
                await use.backend.mount(use.spec, use.blob_path, use.mountpoint)
        except BaseException:
            await use.backend.detach(use.spec, use.blob_path)
            raise

    async def _release_layer(self, digest: str) -> None:
        lock = self._layer_locks.setdefault(digest, asyncio.Lock())
        async with lock:
            use = self._layers.get(digest)
            if use is None:
                return
            use.refs -= 1
            if use.refs > 0:
                return
            if self.layer_linger > 0 and not self._closing:
                if (taking := self._end_recording(use, detaching=False)) is not None:
                    await taking   # its last mount is gone, and so is the startup it recorded
                use.lingering = asyncio.create_task(self._linger(digest, use))
                return
            await self._drop_layer(use)

    async def _linger(self, digest: str, use: LayerUse) -> None:
        await asyncio.sleep(self.layer_linger)
        async with self._layer_locks.setdefault(digest, asyncio.Lock()):
            if self._layers.get(digest) is not use or use.refs > 0:
                return
            use.lingering = None
            if not use.imported and self.hand_over is not None:
                await self.hand_over.if_complete(use, retry=False)   # last chance to spread it before it goes
            await self._drop_layer(use)

    async def _drop_layer(self, use: LayerUse) -> None:
        """Unmount and detach a layer no mount uses any more (its blob file stays in the state dir)."""
        self._layers.pop(use.spec.layer_digest, None)
        # taken while the erofs unmounts, before the detach forgets it
        taking = self._end_recording(use, detaching=True)
        try:
            with phases.phase("release.erofs"):
                if str(use.mountpoint) in await asyncio.to_thread(mounted_paths):
                    await asyncio.to_thread(unmount, use.mountpoint, detach=True)
        finally:
            if taking is not None:
                await taking
        with phases.phase("release.detach"):
            await use.backend.detach(use.spec, use.blob_path)
        with contextlib.suppress(OSError):
            await asyncio.to_thread(use.mountpoint.rmdir)

    def _end_recording(self, use: LayerUse, *, detaching: bool) -> asyncio.Future[None] | None:
        """Close, take and report the layer's open recording (None: it has none). Its backend then fills the
        rest of the blob in the background (a recording holds that fill back, as it would hide reads), unless
        `detaching`: the layer goes now, and a fill started during its unmount would only take CPU and the
        link from it, to be cancelled by the detach."""
        if use.recording is None or use.recording.done() or self.traces is None:
            return None
        use.recording.cancel()
        return asyncio.ensure_future(self._take_recording(use, self.traces, detaching=detaching))

    @staticmethod
    async def _take_recording(use: LayerUse, traces: LearnedTraces, *, detaching: bool) -> None:
        with phases.phase("release.trace"):
            trace = await traces.finish(use.backend, use.spec, detaching=detaching)
        traces.report_in_background(use.spec, use.manifest_digest, trace)

    # -- restart --------------------------------------------------------------------------------

    async def _restore(self) -> None:
        """Adopt the mounts an earlier run left; undo the ones it left half done."""
        mounted = await asyncio.to_thread(mounted_paths)
        for record in await asyncio.to_thread(self.state.records):
            layer_points = [str(self.state.layer_mountpoint(spec)) for spec in record.layers]
            intact = (record.state == "mounted" and record.target in mounted
                      and all(point in mounted for point in layer_points)
                      and all(record.layer_backends.get(s.layer_digest) in self.backends for s in record.layers))
            if intact:
                for spec in record.layers:
                    self._adopt_layer(spec, self.backends[record.layer_backends[spec.layer_digest]])
                self._records[record.mount_id] = record
                MOUNTS.labels(record.backend).inc()
                log.info("adopted the mount of %s at %s", record.image, record.target)
            else:
                log.warning("cleaning up the unfinished or broken mount of %s at %s", record.image, record.target)
                await self._teardown(record)
        await self._restore_leases(mounted)
        # Layer mounts no record uses (a crash between mounting a layer and saving its record).
        used = {str(use.mountpoint) for use in self._layers.values()}
        for point in sorted(await asyncio.to_thread(lambda: list(self.state.layers.iterdir()))):
            if str(point) in used:
                continue
            if str(point) in mounted:
                await asyncio.to_thread(unmount, point, detach=True)
            with contextlib.suppress(OSError):
                await asyncio.to_thread(point.rmdir)

    def _adopt_layer(self, spec: BlobSpec, backend: Backend) -> None:
        """Count one more user of a layer an earlier run left mounted."""
        use = self._layers.get(spec.layer_digest)
        if use is None:
            use = self._layers[spec.layer_digest] = LayerUse(
                spec, backend, self.state.blob_path(spec), self.state.layer_mountpoint(spec))
        use.refs += 1

    async def _restore_leases(self, mounted: set[str]) -> None:
        """Adopt the layers of recorded leases that are still mounted; the others stay recorded and are
        attached again by their client's next AttachLayer (after a reboot, say)."""
        for record in await asyncio.to_thread(self.lease_book.records):
            self._leases[record.lease_id] = record
            if str(self.state.layer_mountpoint(record.layer)) in mounted and record.backend in self.backends:
                self._adopt_layer(record.layer, self.backends[record.backend])
                self._live_leases.add(record.lease_id)
            else:
                log.warning("lease %s: layer %s is no longer mounted; attaching it again under this lease "
                            "brings it back", record.lease_id, record.layer.layer_digest)
        LAYER_LEASES.set(len(self._leases))

    # -- layer leases (afsd snapshotter) ----------------------------------------------------------

    async def attach_layer(self, attach: LayerAttach) -> LeaseRecord:
        """Keep one layer of an image attached and mounted under `attach.lease_id` (idempotent)."""
        lease_id = check_lease_id(attach.lease_id)
        digest = parse_digest(attach.layer_digest)
        async with self._lease_lock(lease_id):
            record = self._leases.get(lease_id)
            if record is not None:
                if record.layer.layer_digest != digest:
                    raise LeaseRequestError(f"lease {lease_id} holds layer {record.layer.layer_digest}, not {digest}")
                if lease_id not in self._live_leases:
                    backend = record.backend if self.available(record.backend) else attach.backend
                    await self._acquire_layer(record.layer, self.choose_backend(backend))
                    self._live_leases.add(lease_id)
                return record
            reference = parse_reference(attach.image)
            if attach.manifest_digest:
                reference = replace(reference, digest=parse_digest(attach.manifest_digest))
            backend = self.choose_backend(attach.backend)
            manifest_digest, spec = await self.locator.locate_layer(reference, parse_platform(attach.platform or None),
                                                                    digest)
            learned = await self.traces.learned(manifest_digest, [spec]) if self.traces else {}
            use = await self._acquire_layer(spec, backend, manifest_digest, learned.get(digest, ()))
            record = LeaseRecord(lease_id=lease_id, image=str(reference), manifest_digest=manifest_digest,
                                 layer=spec, backend=use.backend.name, created_unix=int(time.time()))
            try:
                await asyncio.to_thread(self.lease_book.save, record)
            except BaseException:
                await self._release_layer(digest)
                raise
            self._leases[lease_id] = record
            self._live_leases.add(lease_id)
            LAYER_LEASES.set(len(self._leases))
            log.info("lease %s: layer %s of %s attached (%s)", lease_id, digest, reference, use.backend.name)
            return record

    async def release_lease(self, lease_id: str) -> bool:
        """Drop a lease (False if there is none); its layer goes when nothing else uses it."""
        check_lease_id(lease_id)
        async with self._lease_lock(lease_id):
            record = self._leases.pop(lease_id, None)
            if record is None:
                return False
            # Forget first: a crash in between leaves an unused layer mount, which a restart unmounts.
            await asyncio.to_thread(self.lease_book.forget, lease_id)
            LAYER_LEASES.set(len(self._leases))
            if lease_id in self._live_leases:
                self._live_leases.discard(lease_id)
                await self._release_layer(record.layer.layer_digest)
            log.info("lease %s released (layer %s)", lease_id, record.layer.layer_digest)
            return True

    def _lease_lock(self, lease_id: str) -> asyncio.Lock:
        lock = self._lease_locks.get(lease_id)
        if lock is None:
            lock = self._lease_locks[lease_id] = asyncio.Lock()
        return lock

    def layer_leases(self, prefix: str = "") -> list[tuple[LeaseRecord, bool]]:
        """(record, attached) of every lease whose id starts with `prefix`, oldest first."""
        chosen = [record for lease_id, record in self._leases.items() if lease_id.startswith(prefix)]
        return [(record, record.lease_id in self._live_leases)
                for record in sorted(chosen, key=lambda r: (r.created_unix, r.lease_id))]

    def layer_mountpoint(self, spec: BlobSpec) -> Path:
        return self.state.layer_mountpoint(spec)

    # -- spreading ------------------------------------------------------------------------------

    def source_metrics(self) -> dict[str, float]:
        """What the backends' fetch workers counted (their sources' totals), summed over the backends."""
        summed: dict[str, float] = {}
        for name, backend in self.backends.items():
            if self.available(name):
                for key, value in backend.source_metrics().items():
                    summed[key] = summed.get(key, 0) + value
        return summed

    def metrics_collectors(self) -> list[Collector]:
        """The running backends' own metrics (supervisor counters), to register with /metrics; from
        now on their status is polled to keep them fresh (nobody needs the polling without them)."""
        collectors = [collector for name, backend in self.backends.items()
                      if self.available(name) and (collector := backend.metrics_collector()) is not None]
        if collectors and self._status_poller is None:
            self._status_poller = asyncio.create_task(self._poll_backend_status())
        return collectors

    async def _poll_backend_status(self) -> None:
        """Keep what the backends' collectors report fresh (`afsd mounts` refreshes on its own)."""
        while True:
            for name, backend in self.backends.items():
                if self.available(name):
                    try:
                        await backend.refresh()
                    except (AfsdError, OSError) as error:
                        log.warning("no status from backend %s: %s", name, error)
            await asyncio.sleep(BACKEND_STATUS_PERIOD)

    def _in_background(self, coroutine: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.create_task(coroutine)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task
