"""`containerd.services.snapshots.v1.Snapshots` over gRPC: translation around `Snapshotter`.

containerd reaches this as a proxy plugin and maps status codes back to its own errors: ALREADY_EXISTS
(the layer is there: skip it), NOT_FOUND, FAILED_PRECONDITION, INVALID_ARGUMENT, UNAVAILABLE.
Everything in a request is checked before use: keys and names are opaque strings (never paths) of
bounded size, labels bounded as containerd bounds them.
"""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import grpc
from google.protobuf import empty_pb2, timestamp_pb2

from afsd.api import containerd_mount_pb2 as mpb
from afsd.api import containerd_snapshots_pb2 as pb
from afsd.api import containerd_snapshots_pb2_grpc as pb_grpc
from afsd.errors import AfsdError
from afsd.rpc import StatusTable, abort_for
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

_STATUS: StatusTable = [
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


def _translating_errors(handler: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    """A unary handler whose AfsdErrors end the call with their status code and one-line message."""
    @functools.wraps(handler)
    async def translated(self: SnapshotsService, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await handler(self, request, context)
        except AfsdError as error:
            await abort_for(context, error, _STATUS)
    return translated


class SnapshotsService(pb_grpc.SnapshotsServicer):
    def __init__(self, snapshotter: Snapshotter) -> None:
        self.snapshotter = snapshotter

    @_translating_errors
    async def Prepare(self, request: pb.PrepareSnapshotRequest,
                      context: grpc.aio.ServicerContext) -> pb.PrepareSnapshotResponse:
        mounts = await self.snapshotter.prepare(_name(request.key, "key"),
                                                _name(request.parent, "parent", required=False), dict(request.labels))
        return pb.PrepareSnapshotResponse(mounts=_mounts(mounts))

    @_translating_errors
    async def View(self, request: pb.ViewSnapshotRequest, context: grpc.aio.ServicerContext) -> pb.ViewSnapshotResponse:
        mounts = await self.snapshotter.view(_name(request.key, "key"), _name(request.parent, "parent", required=False),
                                             dict(request.labels))
        return pb.ViewSnapshotResponse(mounts=_mounts(mounts))

    @_translating_errors
    async def Mounts(self, request: pb.MountsRequest, context: grpc.aio.ServicerContext) -> pb.MountsResponse:
        return pb.MountsResponse(mounts=_mounts(await self.snapshotter.mounts(_name(request.key, "key"))))

    @_translating_errors
    async def Commit(self, request: pb.CommitSnapshotRequest, context: grpc.aio.ServicerContext) -> empty_pb2.Empty:
        await self.snapshotter.commit(_name(request.name, "name"), _name(request.key, "key"), dict(request.labels))
        return empty_pb2.Empty()

    @_translating_errors
    async def Remove(self, request: pb.RemoveSnapshotRequest, context: grpc.aio.ServicerContext) -> empty_pb2.Empty:
        await self.snapshotter.remove(_name(request.key, "key"))
        return empty_pb2.Empty()

    @_translating_errors
    async def Stat(self, request: pb.StatSnapshotRequest, context: grpc.aio.ServicerContext) -> pb.StatSnapshotResponse:
        return pb.StatSnapshotResponse(info=_info(await self.snapshotter.stat(_name(request.key, "key"))))

    @_translating_errors
    async def Update(self, request: pb.UpdateSnapshotRequest,
                     context: grpc.aio.ServicerContext) -> pb.UpdateSnapshotResponse:
        snapshot = await self.snapshotter.update(_name(request.info.name, "name"), dict(request.info.labels),
                                                 list(request.update_mask.paths))
        return pb.UpdateSnapshotResponse(info=_info(snapshot))

    async def List(self, request: pb.ListSnapshotsRequest,
                   context: grpc.aio.ServicerContext) -> AsyncIterator[pb.ListSnapshotsResponse]:
        try:
            snapshots = await self.snapshotter.list(list(request.filters))
        except AfsdError as error:
            await abort_for(context, error, _STATUS)
            return
        for start in range(0, len(snapshots), LIST_BATCH):
            yield pb.ListSnapshotsResponse(info=[_info(s) for s in snapshots[start:start + LIST_BATCH]])

    @_translating_errors
    async def Usage(self, request: pb.UsageRequest, context: grpc.aio.ServicerContext) -> pb.UsageResponse:
        size, inodes = await self.snapshotter.usage(_name(request.key, "key"))
        return pb.UsageResponse(size=size, inodes=inodes)

    @_translating_errors
    async def Cleanup(self, request: pb.CleanupRequest, context: grpc.aio.ServicerContext) -> empty_pb2.Empty:
        await self.snapshotter.cleanup()
        return empty_pb2.Empty()
