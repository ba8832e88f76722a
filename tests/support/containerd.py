"""containerd's snapshots API on the afsd snapshotter's own socket: what containerd sends it, for tests
that check what the snapshotter holds (containerd itself: afsd.lab.containerd)."""

from __future__ import annotations

import grpc

from afsd.api import containerd_snapshots_pb2 as pb
from afsd.api import containerd_snapshots_pb2_grpc as pb_grpc
from afsd.lab.containerd import SNAPSHOTTER
from afsd.lab.daemons import Daemon


class SnapshotsClient:
    def __init__(self, daemon: Daemon) -> None:
        assert daemon.socket_path is not None
        self.channel = grpc.aio.insecure_channel(f"unix:{daemon.socket_path}")
        self.stub = pb_grpc.SnapshotsStub(self.channel)

    async def list(self, *filters: str) -> list[pb.Info]:
        return [info async for response in self.stub.List(pb.ListSnapshotsRequest(snapshotter=SNAPSHOTTER,
                                                                                   filters=list(filters)))
                for info in response.info]

    async def cleanup(self) -> None:
        await self.stub.Cleanup(pb.CleanupRequest(snapshotter=SNAPSHOTTER))

    async def close(self) -> None:
        await self.channel.close()
