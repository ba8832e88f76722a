"""`layerstore.v1.LayerStore` over gRPC: request validation and translation around LayerStoreNode."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
from prometheus_client import Counter

from afsd.api import layerstore_pb2 as pb
from afsd.api import layerstore_pb2_grpc as pb_grpc
from afsd.cluster.blobstore import StoredLayer
from afsd.cluster.bytestream_server import ByteStreamServer, caller_address, reader_place
from afsd.cluster.configs import MAX_SHARED_CONFIG
from afsd.cluster.layerstore import ImageRecord, LayerStoreNode, LayerWant
from afsd.cluster.peer_answers import DIGEST, PeerAnswerError
from afsd.cluster.peers import MAX_READ_MESSAGE
from afsd.errors import AfsdError
from afsd.oci.platform import Platform, parse_platform
from afsd.oci.reference import ImageReference, parse_reference
from afsd.rpc import abort_for, refuse

BYTES_SERVED = Counter("afsd_layerstore_bytes_served_total", "Blob bytes sent to readers by ReadLayer, by where "
                       "the reader is (this_host: loopback or this layerstore's own address; other_host)",
                       ["reader"])
# Tickets granted per OpenByteStream call, at most (one per data connection the reader opens).
MAX_TICKETS = 8


def _layer_message(layer: StoredLayer) -> pb.Layer:
    return pb.Layer(digest=layer.digest, media_type=layer.media_type, compressed_size=layer.compressed_size,
                    afs_size=layer.blob.size, cache_path=str(layer.path), cached=True,
                    blob_digest=layer.blob.digest, diff_id=layer.blob.diff_id)


class LayerStoreService(pb_grpc.LayerStoreServicer):
    """`byte_streams`: the data listener OpenByteStream grants tickets for (None: the RPC answers
    UNIMPLEMENTED and readers use ReadLayer); `byte_stream_host`: the address readers dial for it, when not
    the one they reached this service at."""

    def __init__(self, node: LayerStoreNode, byte_streams: ByteStreamServer | None = None,
                 byte_stream_host: str = "") -> None:
        self.node = node
        self.byte_streams = byte_streams
        self.byte_stream_host = byte_stream_host

    async def _digest(self, text: str, context: grpc.aio.ServicerContext) -> str:
        digest = text.strip().lower()
        if not DIGEST.match(digest):
            await refuse(context, grpc.StatusCode.INVALID_ARGUMENT,
                         f"invalid layer digest {text!r}: expected sha256:<64 hex>")
        return digest

    async def _image(self, request: pb.PullImageRequest | pb.HasImageRequest | pb.EnsureLayersRequest,
                     context: grpc.aio.ServicerContext) -> tuple[ImageReference, Platform]:
        if not request.image.strip():
            await refuse(context, grpc.StatusCode.INVALID_ARGUMENT, "image is required")
        try:
            reference = parse_reference(request.image, request.tag or None)
            platform = parse_platform(os=request.platform_os or "linux", architecture=request.platform_arch or "amd64",
                                      variant=request.platform_variant)
        except AfsdError as error:
            await abort_for(context, error)
            raise
        return reference, platform

    async def _stored(self, digest: str, context: grpc.aio.ServicerContext) -> StoredLayer:
        layer = self.node.store.get(digest)
        if layer is None:
            await refuse(context, grpc.StatusCode.NOT_FOUND, f"layer {digest} is not in this layerstore's cache")
        return layer

    @staticmethod
    def _pull_response(record: ImageRecord, reference: ImageReference, layers: list[StoredLayer]) -> pb.PullImageResponse:
        return pb.PullImageResponse(
            resolved_registry=reference.registry, resolved_repository=reference.repository,
            resolved_reference=reference.manifest_reference, layers=[_layer_message(l) for l in layers],
            image_key=record.key, manifest_digest=record.manifest_digest)

    async def PullImage(self, request: pb.PullImageRequest, context: grpc.aio.ServicerContext) -> pb.PullImageResponse:
        reference, platform = await self._image(request, context)
        try:
            record, layers = await self.node.pull_image(reference, platform, force=request.force_local_fetch)
        except AfsdError as error:
            await abort_for(context, error)
            raise
        return self._pull_response(record, reference, layers)

    async def EnsureLayers(self, request: pb.EnsureLayersRequest, context: grpc.aio.ServicerContext) -> pb.EnsureLayersResponse:
        reference, _ = await self._image(request, context)
        wants = []
        for layer in request.layers:
            digest = await self._digest(layer.digest, context)
            wants.append(LayerWant(digest, layer.media_type, layer.compressed_size, layer.diff_id))
        if not wants:
            return pb.EnsureLayersResponse()
        try:
            layers = await self.node.ensure_layers(reference, wants, delegated=request.delegated)
        except AfsdError as error:
            await abort_for(context, error)
            raise
        return pb.EnsureLayersResponse(layers=[_layer_message(l) for l in layers])

    async def HasImage(self, request: pb.HasImageRequest, context: grpc.aio.ServicerContext) -> pb.HasImageResponse:
        reference, platform = await self._image(request, context)
        record = self.node.record_for(reference, platform)
        if record is None:
            return pb.HasImageResponse(found=False, resolved_registry=reference.registry,
                                       resolved_repository=reference.repository,
                                       resolved_reference=reference.manifest_reference)
        missing = sum(1 for layer in record.layers if self.node.store.get(layer.digest) is None)
        return pb.HasImageResponse(found=missing == 0, resolved_registry=reference.registry,
                                   resolved_repository=reference.repository,
                                   resolved_reference=reference.manifest_reference,
                                   total_layers=len(record.layers), missing_layers=missing)

    async def HasLayer(self, request: pb.HasLayerRequest, context: grpc.aio.ServicerContext) -> pb.HasLayerResponse:
        digest = await self._digest(request.digest, context)
        layer = self.node.store.get(digest)
        return pb.HasLayerResponse(digest=digest, found=layer is not None, afs_size=layer.blob.size if layer else 0)

    async def StatLayer(self, request: pb.StatLayerRequest, context: grpc.aio.ServicerContext) -> pb.StatLayerResponse:
        layer = await self._stored(await self._digest(request.digest, context), context)
        self.node.store.touch(layer.digest)
        return layer.to_stat()

    async def ReadImageConfig(self, request: pb.ReadImageConfigRequest,
                              context: grpc.aio.ServicerContext) -> pb.ReadImageConfigResponse:
        digest = await self._digest(request.digest, context)
        data = await self.node.image_config(digest)
        if data is None or len(data) > MAX_SHARED_CONFIG:
            await refuse(context, grpc.StatusCode.NOT_FOUND, f"config {digest} is not kept by this layerstore")
        return pb.ReadImageConfigResponse(digest=digest, data=data)

    async def ReadLayer(self, request: pb.ReadLayerRequest, context: grpc.aio.ServicerContext) -> AsyncIterator[pb.ReadLayerResponse]:
        digest = await self._digest(request.digest, context)
        if request.offset < 0 or request.length <= 0:
            await refuse(context, grpc.StatusCode.INVALID_ARGUMENT,
                         f"invalid range: offset {request.offset} must be >= 0 and length {request.length} > 0")
        layer = await self._stored(digest, context)
        size, path = layer.blob.size, str(layer.path)
        offset, end = request.offset, min(request.offset + request.length, layer.blob.size)
        if offset >= size:
            yield pb.ReadLayerResponse(digest=digest, offset=offset, eof=True)
            return
        try:
            fd = await asyncio.to_thread(os.open, path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            await refuse(context, grpc.StatusCode.NOT_FOUND, f"layer {digest} was evicted")
        served = BYTES_SERVED.labels(reader=reader_place(caller_address(context.peer() or ""),
                                                         self.node.endpoint.rpartition(":")[0]))
        try:
            # The open fd keeps the bytes readable even if the layer is evicted meanwhile.
            while offset < end:
                data = await asyncio.to_thread(os.pread, fd, min(MAX_READ_MESSAGE, end - offset), offset)
                if not data:
                    break
                served.inc(len(data))
                offset += len(data)
                yield pb.ReadLayerResponse(digest=digest, offset=offset - len(data), data=data, eof=offset >= size)
        finally:
            await asyncio.to_thread(os.close, fd)
        self.node.store.touch(digest)

    ReadLayerStream = ReadLayer

    async def OpenByteStream(self, request: pb.OpenByteStreamRequest,
                             context: grpc.aio.ServicerContext) -> pb.OpenByteStreamResponse:
        if self.byte_streams is None:
            await refuse(context, grpc.StatusCode.UNIMPLEMENTED, "this layerstore has no byte-stream listener; "
                                  "use ReadLayer")
        digest = await self._digest(request.digest, context)
        layer = await self._stored(digest, context)
        caller = caller_address(context.peer())
        if caller is None:
            await refuse(context, grpc.StatusCode.FAILED_PRECONDITION,
                         f"byte streams are granted to TCP callers only, not {context.peer()}; use ReadLayer")
        tickets = self.byte_streams.grant(digest, caller, max(1, min(MAX_TICKETS, request.streams)))
        return pb.OpenByteStreamResponse(host=self.byte_stream_host, port=self.byte_streams.port, tickets=tickets,
                                         ticket_ttl_ms=int(self.byte_streams.ticket_ttl * 1000),
                                         tls=self.byte_streams.tls is not None, afs_size=layer.blob.size)

    async def AcquireLayerLease(self, request: pb.AcquireLayerLeaseRequest,
                                context: grpc.aio.ServicerContext) -> pb.AcquireLayerLeaseResponse:
        digests = [await self._digest(d, context) for d in request.digests]
        if not digests:
            await refuse(context, grpc.StatusCode.INVALID_ARGUMENT, "a lease needs at least one digest")
        try:
            lease = self.node.store.acquire_lease(digests, self._ttl(request.ttl_ms))
        except KeyError as missing:
            await refuse(context, grpc.StatusCode.NOT_FOUND,
                         f"layer {missing.args[0]} is not in this layerstore's cache")
        return pb.AcquireLayerLeaseResponse(lease_id=lease.lease_id, digests=lease.digests,
                                            expires_at_unix_ms=int(lease.expires_at * 1000))

    @staticmethod
    def _ttl(ttl_ms: int) -> float:
        return ttl_ms / 1000.0 if ttl_ms > 0 else 120.0

    async def RenewLayerLease(self, request: pb.RenewLayerLeaseRequest,
                              context: grpc.aio.ServicerContext) -> pb.RenewLayerLeaseResponse:
        if not request.lease_id:
            await refuse(context, grpc.StatusCode.INVALID_ARGUMENT, "lease_id is required")
        lease = self.node.store.renew_lease(request.lease_id, self._ttl(request.ttl_ms))
        if lease is None:
            await refuse(context, grpc.StatusCode.NOT_FOUND, f"lease {request.lease_id} is unknown or expired")
        return pb.RenewLayerLeaseResponse(lease_id=lease.lease_id, digests=lease.digests,
                                          expires_at_unix_ms=int(lease.expires_at * 1000))

    async def ReleaseLayerLease(self, request: pb.ReleaseLayerLeaseRequest,
                                context: grpc.aio.ServicerContext) -> pb.ReleaseLayerLeaseResponse:
        return pb.ReleaseLayerLeaseResponse(released=self.node.store.release_lease(request.lease_id))

    async def PruneCache(self, request: pb.PruneCacheRequest, context: grpc.aio.ServicerContext) -> pb.PruneCacheResponse:
        if not 0 < request.percent <= 100:
            await refuse(context, grpc.StatusCode.INVALID_ARGUMENT,
                         f"percent must be in (0, 100], got {request.percent}")
        result = await self.node.store.prune(request.percent)
        self.node.record_evictions(result.evicted)
        return pb.PruneCacheResponse(before_bytes=result.before, after_bytes=result.after,
                                     reclaimed_bytes=result.reclaimed, evicted_layers=len(result.evicted))


class LocalLayerStoreService(pb_grpc.LocalLayerStoreServicer):
    """The admin-socket service: operations that take paths on this machine."""

    def __init__(self, node: LayerStoreNode) -> None:
        self.node = node

    async def ImportLayer(self, request: pb.ImportLayerRequest, context: grpc.aio.ServicerContext) -> pb.ImportLayerResponse:
        if not DIGEST.match(request.stat.digest) or not request.path:
            await refuse(context, grpc.StatusCode.INVALID_ARGUMENT, "ImportLayer needs a path and the layer's stat")
        try:
            layer, imported = await self.node.import_layer(Path(request.path), request.stat)
        except PeerAnswerError as error:
            await refuse(context, grpc.StatusCode.INVALID_ARGUMENT, str(error))
        except FileNotFoundError:
            await refuse(context, grpc.StatusCode.NOT_FOUND, f"{request.path} does not exist")
        except AfsdError as error:
            await abort_for(context, error)
            raise
        return pb.ImportLayerResponse(layer=_layer_message(layer), imported=imported)
