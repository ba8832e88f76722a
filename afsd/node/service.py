"""`afsd.node.v1.Node` over gRPC on the node daemon's unix socket: translation around NodeDaemon."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc

from afsd.api import node_pb2 as pb
from afsd.api import node_pb2_grpc as pb_grpc
from afsd.errors import AfsdError, InvalidReferenceError, NotFoundError
from afsd.node.daemon import NodeDaemon
from afsd.node.images import ImageUnavailableError
from afsd.node.leases import LeaseRecord, LeaseRequestError
from afsd.node.records import MountRecord
from afsd.node.requests import LayerAttach, MountOptions, MountRequestError, UnknownMountError
from afsd.ondemand.base import BackendUnavailableError
from afsd.rpc import StatusTable, abort_for, refuse

_STATUS: StatusTable = [
    (UnknownMountError, grpc.StatusCode.NOT_FOUND),
    (MountRequestError, grpc.StatusCode.FAILED_PRECONDITION),
    (LeaseRequestError, grpc.StatusCode.INVALID_ARGUMENT),
    (BackendUnavailableError, grpc.StatusCode.FAILED_PRECONDITION),
    (InvalidReferenceError, grpc.StatusCode.INVALID_ARGUMENT),
    (NotFoundError, grpc.StatusCode.NOT_FOUND),
    (ImageUnavailableError, grpc.StatusCode.UNAVAILABLE),
]


async def _abort(context: grpc.aio.ServicerContext, error: AfsdError) -> None:
    await abort_for(context, error, _STATUS)


class NodeService(pb_grpc.NodeServicer):
    def __init__(self, daemon: NodeDaemon) -> None:
        self.daemon = daemon

    async def _info(self, record: MountRecord) -> pb.MountInfo:
        layers = []
        for spec in record.layers:
            cached, _, learned = await self.daemon.layer_state(spec)
            layers.append(pb.LayerState(digest=spec.layer_digest, blob_digest=spec.blob_digest, size=spec.size,
                                        cached_bytes=cached, **learned))
        return pb.MountInfo(
            mount_id=record.mount_id, image=record.image, image_key=record.image_key, target=record.target,
            backend=record.backend, created_unix=record.created_unix, layers=layers,
            bytes_cached=sum(l.cached_bytes for l in layers), bytes_total=sum(l.size for l in layers),
            upper=record.upper, extra_dir=record.extra_dir, manifest_digest=record.manifest_digest)

    async def Mount(self, request: pb.MountRequest, context: grpc.aio.ServicerContext) -> pb.MountResponse:
        if not request.image or not request.target:
            await refuse(context, grpc.StatusCode.INVALID_ARGUMENT, "mount needs an image and a target directory")
        if request.tmpfs_upper and request.upper_dir:
            await refuse(context, grpc.StatusCode.INVALID_ARGUMENT, "choose either an upper directory or a tmpfs upper")
        options = MountOptions(
            image=request.image, tag=request.tag, target=Path(request.target), backend=request.backend or "auto",
            platform=request.platform, upper_dir=Path(request.upper_dir) if request.upper_dir else None,
            tmpfs_upper=request.tmpfs_upper, tmpfs_upper_bytes=request.tmpfs_upper_bytes,
            volatile_upper=request.volatile_upper, extra_dir=Path(request.extra_dir) if request.extra_dir else None)
        started = asyncio.get_running_loop().time()
        try:
            record = await self.daemon.mount(options)
        except AfsdError as error:
            await _abort(context, error)
            raise
        return pb.MountResponse(mount=await self._info(record), seconds=asyncio.get_running_loop().time() - started)

    async def Unmount(self, request: pb.UnmountRequest, context: grpc.aio.ServicerContext) -> pb.UnmountResponse:
        try:
            record = await self.daemon.unmount(request.target)
        except AfsdError as error:
            await _abort(context, error)
            raise
        return pb.UnmountResponse(mount=pb.MountInfo(mount_id=record.mount_id, image=record.image,
                                                     target=record.target, backend=record.backend))

    async def ListMounts(self, request: pb.ListMountsRequest, context: grpc.aio.ServicerContext) -> pb.ListMountsResponse:
        counters: dict[str, float] = {}
        for name, backend in self.daemon.backends.items():
            if self.daemon.available(name):
                await backend.refresh()
            counters.update({f"{name}.{key}": value for key, value in backend.counters().items()})
        return pb.ListMountsResponse(mounts=[await self._info(r) for r in self.daemon.mounts()],
                                     backends=self.daemon.backend_availability(), counters=counters)

    async def _lease(self, record: LeaseRecord, attached: bool) -> pb.LayerLease:
        spec = record.layer
        cached = (await self.daemon.layer_state(spec))[0] if attached else 0
        return pb.LayerLease(
            lease_id=record.lease_id, layer_digest=spec.layer_digest, image=record.image,
            manifest_digest=record.manifest_digest, mountpoint=str(self.daemon.layer_mountpoint(spec)),
            implicit_dirs=list(spec.implicit_dirs), backend=record.backend, size=spec.size, cached_bytes=cached,
            created_unix=record.created_unix, attached=attached)

    async def AttachLayer(self, request: pb.AttachLayerRequest,
                          context: grpc.aio.ServicerContext) -> pb.AttachLayerResponse:
        if not request.lease_id or not request.image or not request.layer_digest:
            await refuse(context, grpc.StatusCode.INVALID_ARGUMENT, "attaching a layer needs a lease id, an image "
                                                                    "and a layer digest")
        attach = LayerAttach(lease_id=request.lease_id, image=request.image, layer_digest=request.layer_digest,
                             manifest_digest=request.manifest_digest, backend=request.backend or "auto",
                             platform=request.platform)
        try:
            record = await self.daemon.attach_layer(attach)
        except AfsdError as error:
            await _abort(context, error)
            raise
        return pb.AttachLayerResponse(lease=await self._lease(record, True))

    async def ReleaseLayer(self, request: pb.ReleaseLayerRequest,
                           context: grpc.aio.ServicerContext) -> pb.ReleaseLayerResponse:
        try:
            released = await self.daemon.release_lease(request.lease_id)
        except AfsdError as error:
            await _abort(context, error)
            raise
        return pb.ReleaseLayerResponse(released=released)

    async def ListLayerLeases(self, request: pb.ListLayerLeasesRequest,
                              context: grpc.aio.ServicerContext) -> pb.ListLayerLeasesResponse:
        leases = self.daemon.layer_leases(request.prefix)
        return pb.ListLayerLeasesResponse(leases=[await self._lease(record, attached) for record, attached in leases])
