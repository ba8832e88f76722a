"""`containerd.services.snapshots.v1.Snapshots` over gRPC: translation around `Snapshotter`.

containerd reaches this as a proxy plugin and maps status codes back to its own errors: ALREADY_EXISTS
(the layer is there: skip it), NOT_FOUND, FAILED_PRECONDITION, INVALID_ARGUMENT, UNAVAILABLE.
Everything in a request is checked before use: keys and names are opaque strings (never paths) of
bounded size, labels bounded as containerd bounds them.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence

import grpc
from google.protobuf import empty_pb2, timestamp_pb2

from afsd.api import containerd_mount_pb2 as mpb
from afsd.api import containerd_snapshots_pb2 as pb
from afsd.api import containerd_snapshots_pb2_grpc as pb_grpc
from afsd.errors import AfsdError
from afsd.rpc import status_for
from afsd.snapshotter.filters import FilterSyntaxError
from afsd.snapshotter.layout import MountSpec
from afsd.snapshotter.lazy import NodeLayerError
from afsd.snapshotter.snapshotter import Snapshotter
from afsd.snapshotter.store import (
    Kind,
    Snapshot,
    SnapshotArgumentError,
    SnapshotExistsError,
    SnapshotNotFoundError,
    SnapshotStateError,
)

MAX_NAME_BYTES = 4096
LIST_BATCH = 100

_STATUS = [
    (SnapshotNotFoundError, grpc.StatusCode.NOT_FOUND),
    (SnapshotExistsError, grpc.StatusCode.ALREADY_EXISTS),
    (SnapshotStateError, grpc.StatusCode.FAILED_PRECONDITION),
    (SnapshotArgumentError, grpc.StatusCode.INVALID_ARGUMENT),
    (FilterSyntaxError, grpc.StatusCode.INVALID_ARGUMENT),
    (NodeLayerError, grpc.StatusCode.UNAVAILABLE),
]
_KINDS = {Kind.VIEW: pb.VIEW, Kind.ACTIVE: pb.ACTIVE, Kind.COMMITTED: pb.COMMITTED}


def _name(value: str, what: str, *, required: bool = True) -> str:
    if required and not value:
        raise SnapshotArgumentError(f"the request needs a {what}")
    if len(value.encode()) > MAX_NAME_BYTES or "\0" in value:
        raise SnapshotArgumentError(f"{what} {value[:80]!r}... is not a valid snapshot name")
    return value


def _mounts(specs: Sequence[MountSpec]) -> list[mpb.Mount]:
    return [mpb.Mount(type=m.type, source=m.source, options=list(m.options)) for m in specs]


def _timestamp(ns: int) -> timestamp_pb2.Timestamp:
    return timestamp_pb2.Timestamp(seconds=ns // 1_000_000_000, nanos=ns % 1_000_000_000)


def _info(snapshot: Snapshot) -> pb.Info:
    return pb.Info(name=snapshot.name, parent=snapshot.parent, kind=_KINDS[snapshot.kind],
                   created_at=_timestamp(snapshot.created_ns), updated_at=_timestamp(snapshot.updated_ns),
                   labels=dict(snapshot.labels))


class SnapshotsService(pb_grpc.SnapshotsServicer):
    def __init__(self, snapshotter: Snapshotter) -> None:
        self.snapshotter = snapshotter

    async def _abort(self, context: grpc.aio.ServicerContext, error: AfsdError) -> None:
        code = next((c for kind, c in _STATUS if isinstance(error, kind)), None) or status_for(error)
        await context.abort(code, str(error))

    async def Prepare(self, request: pb.PrepareSnapshotRequest,
                      context: grpc.aio.ServicerContext) -> pb.PrepareSnapshotResponse:
        try:
            mounts = await self.snapshotter.prepare(_name(request.key, "key"),
                                                    _name(request.parent, "parent", required=False),
                                                    dict(request.labels))
        except AfsdError as error:
            await self._abort(context, error)
            raise
        return pb.PrepareSnapshotResponse(mounts=_mounts(mounts))

    async def View(self, request: pb.ViewSnapshotRequest, context: grpc.aio.ServicerContext) -> pb.ViewSnapshotResponse:
        try:
            mounts = await self.snapshotter.view(_name(request.key, "key"),
                                                 _name(request.parent, "parent", required=False), dict(request.labels))
        except AfsdError as error:
            await self._abort(context, error)
            raise
        return pb.ViewSnapshotResponse(mounts=_mounts(mounts))

    async def Mounts(self, request: pb.MountsRequest, context: grpc.aio.ServicerContext) -> pb.MountsResponse:
        try:
            mounts = await self.snapshotter.mounts(_name(request.key, "key"))
        except AfsdError as error:
            await self._abort(context, error)
            raise
        return pb.MountsResponse(mounts=_mounts(mounts))

    async def Commit(self, request: pb.CommitSnapshotRequest, context: grpc.aio.ServicerContext) -> empty_pb2.Empty:
        try:
            await self.snapshotter.commit(_name(request.name, "name"), _name(request.key, "key"), dict(request.labels))
        except AfsdError as error:
            await self._abort(context, error)
            raise
        return empty_pb2.Empty()

    async def Remove(self, request: pb.RemoveSnapshotRequest, context: grpc.aio.ServicerContext) -> empty_pb2.Empty:
        try:
            await self.snapshotter.remove(_name(request.key, "key"))
        except AfsdError as error:
            await self._abort(context, error)
            raise
        return empty_pb2.Empty()

    async def Stat(self, request: pb.StatSnapshotRequest, context: grpc.aio.ServicerContext) -> pb.StatSnapshotResponse:
        try:
            snapshot = await self.snapshotter.stat(_name(request.key, "key"))
        except AfsdError as error:
            await self._abort(context, error)
            raise
        return pb.StatSnapshotResponse(info=_info(snapshot))

    async def Update(self, request: pb.UpdateSnapshotRequest,
                     context: grpc.aio.ServicerContext) -> pb.UpdateSnapshotResponse:
        try:
            snapshot = await self.snapshotter.update(_name(request.info.name, "name"), dict(request.info.labels),
                                                     list(request.update_mask.paths))
        except AfsdError as error:
            await self._abort(context, error)
            raise
        return pb.UpdateSnapshotResponse(info=_info(snapshot))

    async def List(self, request: pb.ListSnapshotsRequest,
                   context: grpc.aio.ServicerContext) -> AsyncIterator[pb.ListSnapshotsResponse]:
        try:
            snapshots = await self.snapshotter.list(list(request.filters))
        except AfsdError as error:
            await self._abort(context, error)
            raise
        for start in range(0, len(snapshots), LIST_BATCH):
            yield pb.ListSnapshotsResponse(info=[_info(s) for s in snapshots[start:start + LIST_BATCH]])

    async def Usage(self, request: pb.UsageRequest, context: grpc.aio.ServicerContext) -> pb.UsageResponse:
        try:
            size, inodes = await self.snapshotter.usage(_name(request.key, "key"))
        except AfsdError as error:
            await self._abort(context, error)
            raise
        return pb.UsageResponse(size=size, inodes=inodes)

    async def Cleanup(self, request: pb.CleanupRequest, context: grpc.aio.ServicerContext) -> empty_pb2.Empty:
        try:
            await self.snapshotter.cleanup()
        except AfsdError as error:
            await self._abort(context, error)
            raise
        return empty_pb2.Empty()
