"""The layerstore's logic: getting an image's layers into the local cache with one registry pull per
layer per cluster.

Where a missing layer comes from, in order:
1. a peer that holds it (discovery `FindProvider`): copied over `ReadLayer`, every chunk verified;
2. a peer that is pulling it from the registry right now: asked to finish (`EnsureLayers`), then copied;
3. the layer's *designated puller* — the live layerstore ranked first for that digest by rendezvous
   hashing over discovery's node list, which every node computes alike — asked to fetch it
   (`EnsureLayers`, marked delegated so it never delegates further), then copied;
4. the registry, by this node: download, verify, convert.
So when several nodes want a layer at once, they all end up waiting on one registry download. Inside
a node, concurrent requests for one image or one layer share a single flight.

The reference AFS answered "a peer has the image" by skipping the download entirely (the caller had to
read from that peer), trusted peers that had not finished their own pull, and verified nothing; here a
pull returns only when the layers are in this node's cache and verified.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import shutil
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import grpc
from prometheus_client import Counter, Gauge

from afsd.api import discovery_pb2
from afsd.api import layerstore_pb2 as pb
from afsd.cluster.blobstore import BlobStore, Reservation, StoredLayer
from afsd.cluster.configs import HolderLookup
from afsd.cluster.discovery_client import DiscoveryClient, DiscoveryUnavailableError
from afsd.cluster.keys import image_key
from afsd.cluster.peer_answers import PeerAnswerError, check_stat
from afsd.cluster.peers import BlobHashes, LayerStorePeer, PeerLayer, copy_layer, stat_to_peer_layer
from afsd.erofs.convert import convert_layer_async, converter_identity
from afsd.errors import AfsdError, DigestMismatchError
from afsd.oci.client import RegistryClient
from afsd.oci.digest import is_blob, parse_digest
from afsd.oci.manifest import Descriptor
from afsd.oci.mediatypes import layer_compression
from afsd.oci.platform import Platform
from afsd.oci.reference import ImageReference
from afsd.progress import ProgressLog
from afsd.rpc import ChannelPool
from afsd.trust.descriptors import BlobTrust

log = logging.getLogger(__name__)
T = TypeVar("T")

REGISTRY_BYTES = Counter("afsd_layerstore_registry_bytes_total", "Layer bytes downloaded from registries")
PEER_BYTES = Counter("afsd_layerstore_peer_bytes_total", "Blob bytes copied from peer layerstores")
LAYERS_FETCHED = Counter("afsd_layerstore_layers_fetched_total", "Layers added to the cache, by source",
                         ["source"])
EVICTIONS = Counter("afsd_layerstore_evictions_total", "Layers evicted from the cache")
CACHE_BYTES = Gauge("afsd_layerstore_cache_bytes", "Bytes of blobs in the cache")
CACHE_LIMIT = Gauge("afsd_layerstore_cache_limit_bytes", "The cache's size limit")
CACHE_RESERVED = Gauge("afsd_layerstore_cache_reserved_bytes", "Bytes promised to pulls in progress")
CACHE_LAYERS = Gauge("afsd_layerstore_cache_layers", "Layers in the cache")

# Expected erofs size per compressed byte, for reservations before the real size is known.
_EXPANSION = {"gzip": 4.0, "zstd": 4.0, "none": 1.1}
_PER_LAYER_OVERHEAD = 1 << 20
RESOLVE_TTL = 60.0


@dataclass(frozen=True)
class LayerWant:
    """A registry layer an image needs."""

    digest: str
    media_type: str
    size: int
    diff_id: str = ""

    def estimate(self) -> int:
        try:
            factor = _EXPANSION[layer_compression(self.media_type)]
        except AfsdError:
            factor = 4.0
        return int(max(self.size, 1) * factor) + _PER_LAYER_OVERHEAD

    def descriptor(self) -> Descriptor:
        return Descriptor(media_type=self.media_type, digest=self.digest, size=self.size)


@dataclass
class ImageRecord:
    key: str
    reference: str
    platform: str
    manifest_digest: str
    layers: list[LayerWant]
    config: dict[str, Any] = field(default_factory=dict)
    resolved_at: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "layers": [asdict(layer) for layer in self.layers]}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "ImageRecord":
        return cls(key=data["key"], reference=data["reference"], platform=data["platform"],
                   manifest_digest=data["manifest_digest"],
                   layers=[LayerWant(**layer) for layer in data["layers"]],
                   config=data.get("config", {}), resolved_at=float(data.get("resolved_at", 0)))


def _link_or_copy_verified(source: Path, dest: Path, layer: PeerLayer) -> None:
    """Place `source` at `dest` (hard link, else copy) and check it is exactly `layer`'s blob."""
    try:
        os.link(source, dest)
    except OSError:
        shutil.copyfile(source, dest)
    try:
        table, hashes = layer.chunks, BlobHashes(layer.blob)
        with open(dest, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            if size != layer.blob.size:   # (else the chunk table refuses a short last chunk with a ValueError)
                raise DigestMismatchError(f"{source} has {size} bytes, the blob {layer.blob.digest} of "
                                          f"{layer.digest} has {layer.blob.size}")
            for offset in range(0, max(layer.blob.size, 1), table.chunk_size):
                data = handle.read(table.chunk_size)
                table.check(offset, data, source=str(source))
                hashes.update(offset, data)
            hashes.check(f"{source} (layer {layer.digest})")
            os.fsync(handle.fileno())  # the assembler may never have synced it
    except BaseException:
        dest.unlink(missing_ok=True)
        raise


def rendezvous_order(digest: str, nodes: Iterable[discovery_pb2.ServiceInstance]) -> list[discovery_pb2.ServiceInstance]:
    """Nodes ranked for `digest` by highest-random-weight hashing: every node computes the same order
    from the same membership, and a node joining or leaving moves only its own share of layers."""
    def weight(node: discovery_pb2.ServiceInstance) -> bytes:
        return hashlib.sha256(f"{digest}|{node.node_id}|{node.endpoint}".encode()).digest()
    return sorted(nodes, key=weight, reverse=True)


class _SingleFlight:
    """Concurrent calls with the same key share one execution; its result or error goes to all."""

    def __init__(self) -> None:
        self._flights: dict[str, asyncio.Future[Any]] = {}

    def active(self) -> set[str]:
        return set(self._flights)

    async def run(self, key: str, work: Callable[[], Awaitable[T]]) -> T:
        flight = self._flights.get(key)
        if flight is None:
            flight = asyncio.ensure_future(work())
            self._flights[key] = flight
            flight.add_done_callback(lambda done: self._finished(key, done))
        return await asyncio.shield(flight)

    def _finished(self, key: str, flight: asyncio.Future[Any]) -> None:
        if self._flights.get(key) is flight:
            del self._flights[key]
        if not flight.cancelled():
            flight.exception()  # retrieved: every waiter got it already


class LayerStoreNode:
    def __init__(self, store: BlobStore, *, node_id: str, endpoint: str, registry: RegistryClient,
                 discovery: DiscoveryClient | None = None, channels: ChannelPool | None = None,
                 fetch_concurrency: int = 3, resolve_ttl: float = RESOLVE_TTL, trust: BlobTrust | None = None) -> None:
        """`trust`: signs the descriptors of blobs converted here and verifies those of blobs copied or
        imported (dev mode, the default: neither)."""
        self.store = store
        self.trust = trust or BlobTrust(None)
        self.node_id = node_id
        self.endpoint = endpoint
        self.registry = registry
        self.discovery = discovery
        self.channels = channels or ChannelPool()
        self.resolve_ttl = resolve_ttl
        self.changed = asyncio.Event()   # set when what we would heartbeat has changed
        # Registry downloads and conversions are the heavy part; peer copies get their own slots.
        # Waiting for a peer (delegation) holds no slot, so nodes waiting on each other cannot deadlock.
        self._registry_slots = asyncio.Semaphore(fetch_concurrency)
        self._copy_slots = asyncio.Semaphore(fetch_concurrency * 2)
        self._image_flights = _SingleFlight()
        self._layer_flights = _SingleFlight()
        self._registry_pulls: set[str] = set()
        self._image_records: dict[str, ImageRecord] = {}
        self.converter = ""

    async def start(self) -> None:
        await self.store.open()
        self.converter = await asyncio.to_thread(converter_identity)
        if self.trust.verifying:
            await self._drop_unverifiable()
        for document in await self.store.images():
            try:
                record = ImageRecord.from_json(document)
            except (KeyError, TypeError, ValueError):
                continue
            self._image_records[record.key] = record
        CACHE_LIMIT.set(self.store.limit)
        CACHE_BYTES.set_function(self.store.usage)
        CACHE_RESERVED.set_function(self.store.reserved)
        CACHE_LAYERS.set_function(lambda: len(self.store.layers()))
        log.info("layerstore %s: %d layers (%d bytes) of %d allowed, %d images", self.node_id,
                 len(self.store.layers()), self.store.usage(), self.store.limit, len(self._image_records))

    def _changed(self) -> None:
        self.changed.set()

    async def _drop_unverifiable(self) -> None:
        """With TLS, serve only blobs whose signed descriptor verifies (not those cached in dev mode)."""
        for layer in self.store.layers():
            try:
                self.trust.verified_descriptor(layer.to_stat(), layer.digest, peer=f"the cache entry {layer.path}")
            except PeerAnswerError as error:
                log.warning("removing %s from the cache: %s", layer.digest, error.problem)
                await self.store.remove(layer.digest)

    # -- what we advertise ----------------------------------------------------------------------

    def complete_images(self) -> list[str]:
        return sorted(key for key, record in self._image_records.items()
                      if all(self.store.get(layer.digest) for layer in record.layers))

    def heartbeat_request(self) -> discovery_pb2.HeartbeatRequest:
        layers = sorted(self.store.layers(), key=lambda l: l.digest)
        return discovery_pb2.HeartbeatRequest(
            node_id=self.node_id, endpoint=self.endpoint,
            layer_digests=[l.digest for l in layers],
            layer_stats=[discovery_pb2.LayerStat(digest=l.digest, afs_size=l.blob.size, blob_digest=l.blob.digest)
                         for l in layers],
            cached_images=self.complete_images(),
            pulling_images=sorted(self._image_flights.active()),
            pulling_layers=sorted(self._registry_pulls),
            cache_max_bytes=self.store.limit)

    # -- resolving ------------------------------------------------------------------------------

    async def resolve(self, reference: ImageReference, platform: Platform, *, force: bool = False) -> ImageRecord:
        """The image's layer list: from our record if fresh, else discovery, else the registry."""
        key = image_key(reference, platform)
        known = self._image_records.get(key)
        fresh = known is not None and (reference.digest or time.time() - known.resolved_at < self.resolve_ttl)
        if known is not None and fresh and not force:
            return known
        try:
            record = await self._resolve_remotely(reference, platform, key, force)
        except AfsdError as error:
            if known is None or force:
                raise
            log.warning("re-resolving %s failed (%s); using the layer list resolved %.0fs ago",
                        key, error, time.time() - known.resolved_at)
            return known
        self._image_records[key] = record
        await self.store.save_image(key, record.to_json())
        return record

    async def _resolve_remotely(self, reference: ImageReference, platform: Platform, key: str,
                                force: bool) -> ImageRecord:
        if self.discovery is not None and self.discovery.endpoints:
            # Through discovery first: all layerstores ask the same replica, so a burst of pulls
            # costs the registry one manifest and config fetch.
            request = discovery_pb2.ResolveImageRequest(
                image=str(reference), platform_os=platform.os, platform_arch=platform.architecture,
                platform_variant=platform.variant, force_refresh=force)
            try:
                response = await self.discovery.resolve_image(request)
            except DiscoveryUnavailableError as error:
                log.warning("resolving %s through discovery failed (%s); asking the registry", key, error)
            except grpc.aio.AioRpcError as error:
                log.warning("discovery could not resolve %s (%s: %s); asking the registry", key,
                            error.code().name, error.details())
            else:
                await self._keep_config(response)
                config = response.runtime_config
                return ImageRecord(
                    key=key, reference=str(reference), platform=str(platform),
                    manifest_digest=response.manifest_digest,
                    layers=[LayerWant(l.digest, l.media_type, l.compressed_size, l.diff_id) for l in response.layers],
                    config={"entrypoint": list(config.entrypoint), "cmd": list(config.cmd), "env": list(config.env),
                            "working_dir": config.working_dir, "user": config.user},
                    resolved_at=time.time())
        image = await self.registry.resolve(reference, platform)
        diff_ids = image.config.diff_ids if len(image.config.diff_ids) == len(image.layers) else [""] * len(image.layers)
        config = image.config
        return ImageRecord(
            key=key, reference=str(reference), platform=str(platform), manifest_digest=image.manifest_digest,
            layers=[LayerWant(d.digest, d.media_type, d.size, diff_id) for d, diff_id in zip(image.layers, diff_ids)],
            config={"entrypoint": config.entrypoint, "cmd": config.cmd, "env": config.env,
                    "working_dir": config.working_dir, "user": config.user},
            resolved_at=time.time())

    async def _keep_config(self, response: discovery_pb2.ResolveImageResponse) -> None:
        """Keep the config blob discovery sent (if it is what it claims), to serve it to the cluster."""
        if not response.config:
            return
        try:
            digest = parse_digest(response.config_digest)
        except AfsdError:
            log.warning("discovery sent the config of %s with an invalid digest %r", response.image_key,
                        response.config_digest)
            return
        if not is_blob(response.config, digest, len(response.config)):
            log.warning("discovery sent a config for %s that is not the blob %s; not keeping it",
                        response.image_key, digest)
            return
        await self.registry.metadata.add_config(digest, response.config)

    async def image_config(self, digest: str) -> bytes | None:
        """A config blob this node keeps (of an image it resolved), for `ReadImageConfig`."""
        return await self.registry.metadata.config(digest)

    # -- pulling --------------------------------------------------------------------------------

    async def pull_image(self, reference: ImageReference, platform: Platform, *,
                         force: bool = False) -> tuple[ImageRecord, list[StoredLayer]]:
        """Make every layer of the image present here; concurrent pulls of one image share one."""
        key = image_key(reference, platform)
        return await self._image_flights.run(key, lambda: self._pull(reference, platform, key, force))

    async def _pull(self, reference: ImageReference, platform: Platform, key: str,
                    force: bool) -> tuple[ImageRecord, list[StoredLayer]]:
        self._changed()
        try:
            record = await self.resolve(reference, platform, force=force)
            layers = await self.ensure_layers(reference, record.layers, what=f"image {key}")
        finally:
            self._changed()
        return record, layers

    async def ensure_layers(self, reference: ImageReference, wants: list[LayerWant], *,
                            delegated: bool = False, what: str = "") -> list[StoredLayer]:
        """Make `wants` present (reserving space for the missing ones first); return them in order."""
        unique = list({w.digest: w for w in wants}.values())
        missing = [w for w in unique if self.store.get(w.digest) is None]
        protected = frozenset(w.digest for w in unique)
        if missing:
            # Space is reserved per layer once its download or copy has a slot (_reserved): pulls
            # queued behind the slots hold no cache space. Only an image that can never fit fails here.
            # A zero-byte reservation keeps the image's layers from eviction until the pull is over.
            what = what or f"{len(missing)} layers of {reference}"
            self.store.check_fits(sum(w.estimate() for w in missing), what)
            pulling, _ = await self.store.reserve(0, protected, what)
            try:
                async with asyncio.TaskGroup() as group:
                    for want in missing:
                        group.create_task(self._ensure_one(reference, want, protected, delegated))
            except BaseExceptionGroup as failure:
                raise failure.exceptions[0] from None
            finally:
                self.store.release(pulling)
            self.record_evictions(await self.store.enforce_limit(protected))
        result = []
        for want in wants:
            layer = self.store.get(want.digest)
            if layer is None:  # evicted between landing and now: only if the cache is far too small
                raise AfsdError(f"layer {want.digest} was evicted while {reference} was being pulled; "
                                "the cache limit is too small for this image")
            self.store.touch(want.digest)
            result.append(layer)
        return result

    def record_evictions(self, evicted: list[str]) -> None:
        if evicted:
            EVICTIONS.inc(len(evicted))
            self._changed()

    async def _ensure_one(self, reference: ImageReference, want: LayerWant, protected: frozenset[str],
                          delegated: bool) -> StoredLayer:
        existing = self.store.get(want.digest)
        if existing is not None:
            return existing
        return await self._layer_flights.run(
            want.digest, lambda: self._fetch(reference, want, protected, delegated))

    @contextlib.asynccontextmanager
    async def _reserved(self, want: LayerWant, protected: frozenset[str]) -> AsyncIterator[Reservation]:
        """Cache space for one layer, held while it is fetched (taken inside a download/copy slot)."""
        reservation, evicted = await self.store.reserve(want.estimate(), protected, f"layer {want.digest}")
        self.record_evictions(evicted)
        try:
            yield reservation
        finally:
            self.store.release(reservation)

    async def _fetch(self, reference: ImageReference, want: LayerWant, protected: frozenset[str],
                     delegated: bool) -> StoredLayer:
        layer = await self._fetch_from_peers(reference, want, protected, delegated)
        if layer is None:
            async with self._registry_slots, self._reserved(want, protected) as reservation:
                layer = await self._fetch_from_registry(reference, want, reservation)
        self._changed()
        return layer

    async def _fetch_from_peers(self, reference: ImageReference, want: LayerWant, protected: frozenset[str],
                                delegated: bool) -> StoredLayer | None:
        if self.discovery is None or not self.discovery.endpoints:
            return None
        tried: set[str] = {self.endpoint}
        try:
            nodes = await self.discovery.find_provider(want.digest, include_pulling=True, requester=self.endpoint)
        except (DiscoveryUnavailableError, grpc.aio.AioRpcError) as error:
            log.warning("cannot ask discovery who has %s: %s", want.digest, error)
            return None
        holders = [n for n in nodes if want.digest in n.layer_digests and n.endpoint not in tried]
        pullers = [n for n in nodes if want.digest in n.pulling_layers and want.digest not in n.layer_digests
                   and n.endpoint not in tried]
        for node in rendezvous_order(want.digest, holders):
            layer = await self._copy_from(node.endpoint, want, protected)
            tried.add(node.endpoint)
            if layer is not None:
                return layer
        for node in rendezvous_order(want.digest, pullers):
            layer = await self._delegate(node.endpoint, reference, want, protected)
            tried.add(node.endpoint)
            if layer is not None:
                return layer
        if delegated:
            return None  # we were chosen to fetch it: from the registry, then
        try:
            everyone = await self.discovery.list_nodes()
        except (DiscoveryUnavailableError, grpc.aio.AioRpcError):
            return None
        order = rendezvous_order(want.digest, list(everyone) + [self._self_instance()])
        designated = next((n for n in order if n.endpoint not in tried or n.endpoint == self.endpoint), None)
        if designated is None or designated.endpoint == self.endpoint:
            return None
        return await self._delegate(designated.endpoint, reference, want, protected)

    def _self_instance(self) -> discovery_pb2.ServiceInstance:
        return discovery_pb2.ServiceInstance(node_id=self.node_id, endpoint=self.endpoint)

    async def _delegate(self, endpoint: str, reference: ImageReference, want: LayerWant,
                        protected: frozenset[str]) -> StoredLayer | None:
        """Ask `endpoint` to get the layer (from a holder or the registry), then copy it from there."""
        peer = LayerStorePeer(endpoint, self.channels)
        log.info("asking %s to fetch %s for us", endpoint, want.digest)
        request = pb.EnsureLayersRequest(
            image=str(reference),
            layers=[pb.Layer(digest=want.digest, media_type=want.media_type,
                             compressed_size=want.size, diff_id=want.diff_id)],
            delegated=True)
        try:
            await peer.ensure_layers(request, timeout=3600)
        except grpc.aio.AioRpcError as error:
            log.warning("peer %s could not fetch %s: %s %s", endpoint, want.digest, error.code().name, error.details())
            return None
        return await self._copy_from(endpoint, want, protected)

    async def _copy_from(self, endpoint: str, want: LayerWant, protected: frozenset[str]) -> StoredLayer | None:
        peer = LayerStorePeer(endpoint, self.channels)
        partial = self.store.new_partial(want.digest)
        try:
            layer = await peer.stat(want.digest, diff_id=want.diff_id or None, trust=self.trust)
            problem = self._unusable(layer, want)
            if problem:
                log.warning("not copying %s from %s: %s", want.digest, endpoint, problem)
                return None
            async with self._copy_slots, self._reserved(want, protected) as reservation:
                copied = await copy_layer(peer, layer, partial, data_tls=self.channels.data_tls)
                PEER_BYTES.inc(copied)
                LAYERS_FETCHED.labels("peer").inc()
                log.info("copied %s (%d bytes) from %s", want.digest, copied, endpoint)
                return await self.store.commit(want.digest, want.media_type, want.size, layer.blob, partial,
                                               reservation, want.estimate(), layer.descriptor.SerializeToString())
        except grpc.aio.AioRpcError as error:
            log.warning("copying %s from %s failed: %s %s", want.digest, endpoint, error.code().name, error.details())
            return None
        except DigestMismatchError as error:
            log.error("corrupt data from peer: %s", error)
            return None
        except PeerAnswerError as error:
            log.warning("not copying %s: unusable answer from %s", want.digest, error)
            return None

    def _unusable(self, layer: PeerLayer, want: LayerWant) -> str:
        if layer.blob.converter != self.converter:
            return f"made by converter {layer.blob.converter!r}, this node runs {self.converter!r}"
        return ""

    async def _fetch_from_registry(self, reference: ImageReference, want: LayerWant,
                                   reservation: Reservation) -> StoredLayer:
        download = self.store.new_partial(want.digest).with_suffix(".layer")
        converted = self.store.new_partial(want.digest).with_suffix(".erofs")
        self._registry_pulls.add(want.digest)
        self._changed()
        progress = ProgressLog(log, f"layer {want.digest}")   # a line every 10 s for a long one
        try:
            log.info("pulling %s from %s", want.digest, reference.registry)
            await self.registry.fetch_blob(reference, want.descriptor(), download,
                                           progress=lambda done: progress("downloading", done, want.size))
            REGISTRY_BYTES.inc(want.size)
            blob = await convert_layer_async(download, layer_compression(want.media_type), want.digest,
                                             converted, expected_diff_id=want.diff_id or None,
                                             work_dir=self.store.tmp_dir, progress=progress)
        finally:
            self._registry_pulls.discard(want.digest)
            await asyncio.to_thread(download.unlink, missing_ok=True)
        LAYERS_FETCHED.labels("registry").inc()
        try:
            return await self.store.commit(want.digest, want.media_type, want.size, blob, converted,
                                           reservation, want.estimate(), self.trust.sign(blob).SerializeToString())
        except BaseException:
            await asyncio.to_thread(converted.unlink, missing_ok=True)
            raise

    # -- adopting blobs assembled on this node ---------------------------------------------------

    async def import_layer(self, path: Path, stat: pb.StatLayerResponse) -> tuple[StoredLayer, bool]:
        """Adopt the complete blob at `path` (assembled by this node's on-demand mounts) as the blob
        `stat` describes.

        `stat` is checked like a peer's answer (with TLS: against the converter's signed descriptor);
        the file against its chunk table and blob digest; then it is hard-linked (or copied, across
        filesystems) into the cache, and afterwards this node advertises the layer.
        """
        check_stat(stat, stat.digest, peer="ImportLayer")
        self.trust.verified_descriptor(stat, stat.digest, peer="ImportLayer")
        layer = stat_to_peer_layer(stat)
        existing = self.store.get(layer.digest)
        if existing is not None:
            return existing, False
        problem = self._unusable(layer, LayerWant(layer.digest, layer.media_type, layer.compressed_size))
        if problem:
            raise AfsdError(f"cannot import {layer.digest}: {problem}")
        partial = self.store.new_partial(layer.digest)
        await asyncio.to_thread(_link_or_copy_verified, path, partial, layer)
        try:
            reservation, evicted = await self.store.reserve(layer.blob.size, [layer.digest], f"layer {layer.digest}")
        except BaseException:
            await asyncio.to_thread(partial.unlink, missing_ok=True)
            raise
        self.record_evictions(evicted)
        try:
            stored = await self.store.commit(layer.digest, layer.media_type, layer.compressed_size, layer.blob,
                                             partial, reservation, layer.blob.size, layer.descriptor.SerializeToString())
        finally:
            self.store.release(reservation)
        LAYERS_FETCHED.labels("import").inc()
        self._changed()
        return stored, True

    # -- queries --------------------------------------------------------------------------------

    def record_for(self, reference: ImageReference, platform: Platform) -> ImageRecord | None:
        return self._image_records.get(image_key(reference, platform))


def config_holders(discovery: DiscoveryClient, own_endpoint: str) -> HolderLookup:
    """For the registry client's `ClusterConfigSource`: other layerstores that hold all of an image's
    layers (so pulled it and keep its config), as discovery knows them."""
    async def holders(layer_digests: list[str]) -> list[str]:
        if not discovery.endpoints:
            return []
        # Discovery cuts each record down to the layer asked about: one question per layer, intersected.
        held: set[str] | None = None
        for digest in layer_digests:
            try:
                nodes = await discovery.find_provider(digest)
            except (DiscoveryUnavailableError, grpc.aio.AioRpcError) as error:
                log.info("cannot ask discovery who holds %s: %s", digest, error)
                return []
            endpoints = {node.endpoint for node in nodes} - {own_endpoint}
            held = endpoints if held is None else held & endpoints
            if not held:
                return []
        return sorted(held or ())
    return holders
