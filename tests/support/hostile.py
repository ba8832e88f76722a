"""Hostile peers for tests: a fake layerstore and a fake discovery replica, in the test's process,
speaking the real protos (`layerstore.v1.LayerStore`, `discovery.v1.ServiceDiscovery`).

`ForgingLayerStore` relays to a real layerstore (its "origin", which nobody else knows about) and
rewrites what it answers with a forgery chosen by the test; `heartbeat_forever` makes discovery list it
as a holder of the origin's layers, as a real layerstore's heartbeat would. `ForgingDiscovery` relays to
a real discovery replica and replaces the answers a test picks.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import grpc

from afsd.api import discovery_pb2 as dpb
from afsd.api import discovery_pb2_grpc as dgrpc
from afsd.api import layerstore_pb2 as lpb
from afsd.api import layerstore_pb2_grpc as lgrpc

StatForgery = Callable[[lpb.StatLayerResponse], lpb.StatLayerResponse]
BytesForgery = Callable[[str, int, bytes], bytes]   # (layer digest, offset, data) -> data sent


@dataclass
class ForgingLayerStore(lgrpc.LayerStoreServicer):
    """A layerstore that relays to `origin` and forges on the way; `calls` records (method, digest).
    A reader that believed a forged layer digest gets the real layer's bytes under that name."""

    origin: lgrpc.LayerStoreStub
    forge_stat: StatForgery | None = None
    forge_bytes: BytesForgery | None = None
    calls: list[tuple[str, str]] = field(default_factory=list)
    _real_digest: dict[str, str] = field(default_factory=dict)   # forged layer digest -> the one asked for

    async def StatLayer(self, request: lpb.StatLayerRequest, context: grpc.aio.ServicerContext) -> lpb.StatLayerResponse:
        self.calls.append(("StatLayer", request.digest))
        answer = await self.origin.StatLayer(lpb.StatLayerRequest(digest=self._real_digest.get(request.digest,
                                                                                                request.digest)))
        if self.forge_stat is not None:
            copy = lpb.StatLayerResponse()
            copy.CopyFrom(answer)
            answer = self.forge_stat(copy)
            self._real_digest[answer.digest] = request.digest
        return answer

    async def ReadLayer(self, request: lpb.ReadLayerRequest,
                        context: grpc.aio.ServicerContext) -> AsyncIterator[lpb.ReadLayerResponse]:
        self.calls.append(("ReadLayer", request.digest))
        real = lpb.ReadLayerRequest(digest=self._real_digest.get(request.digest, request.digest),
                                    offset=request.offset, length=request.length)
        async for message in self.origin.ReadLayer(real):
            message.digest = request.digest
            if self.forge_bytes is not None and message.data:
                message.data = self.forge_bytes(request.digest, message.offset, message.data)
            yield message

    ReadLayerStream = ReadLayer


    async def AcquireLayerLease(self, request: lpb.AcquireLayerLeaseRequest,
                                context: grpc.aio.ServicerContext) -> lpb.AcquireLayerLeaseResponse:
        return lpb.AcquireLayerLeaseResponse(lease_id="forged-lease", digests=request.digests)

    async def RenewLayerLease(self, request: lpb.RenewLayerLeaseRequest,
                              context: grpc.aio.ServicerContext) -> lpb.RenewLayerLeaseResponse:
        return lpb.RenewLayerLeaseResponse(lease_id=request.lease_id)

    async def ReleaseLayerLease(self, request: lpb.ReleaseLayerLeaseRequest,
                                context: grpc.aio.ServicerContext) -> lpb.ReleaseLayerLeaseResponse:
        return lpb.ReleaseLayerLeaseResponse(released=True)


@dataclass
class ForgingDiscovery(dgrpc.ServiceDiscoveryServicer):
    """A discovery replica that relays to `real`, except for the answers the test forges."""

    real: dgrpc.ServiceDiscoveryStub
    forge_find_provider: Callable[[dpb.FindProviderResponse], dpb.FindProviderResponse] | None = None

    async def Heartbeat(self, request, context):
        return await self.real.Heartbeat(request)

    async def FindImage(self, request, context):
        return await self.real.FindImage(request)

    async def FindImageProvider(self, request, context):
        return await self.real.FindImageProvider(request)

    async def ResolveImage(self, request, context):
        return await self.real.ResolveImage(request)

    async def FindProvider(self, request, context):
        answer = await self.real.FindProvider(request)
        return self.forge_find_provider(answer) if self.forge_find_provider is not None else answer

    async def ReportAccessTrace(self, request, context):
        return await self.real.ReportAccessTrace(request)

    async def GetAccessTraces(self, request, context):
        return await self.real.GetAccessTraces(request)


@contextlib.asynccontextmanager
async def serving(add: Callable[[grpc.aio.Server], None], host: str = "127.0.0.1",
                  credentials: grpc.ServerCredentials | None = None) -> AsyncIterator[str]:
    """A gRPC server with the services `add` registers, on a free port of `host`; yields its address."""
    server = grpc.aio.server()
    add(server)
    address = f"{host}:0"
    port = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    await server.start()
    try:
        yield f"{host}:{port}"
    finally:
        await server.stop(0)


async def heartbeat_forever(discovery: dgrpc.ServiceDiscoveryStub, request: dpb.HeartbeatRequest,
                            period: float = 1.0) -> None:
    """Heartbeat `request` every `period` seconds (cancel the task to stop); errors are ignored."""
    while True:
        with contextlib.suppress(grpc.aio.AioRpcError):
            await discovery.Heartbeat(request, timeout=5)
        await asyncio.sleep(period)


@contextlib.asynccontextmanager
async def fake_holder(fake: ForgingLayerStore, discovery: dgrpc.ServiceDiscoveryStub, node_id: str,
                      stats: list[lpb.StatLayerResponse], *, host: str = "127.0.0.1",
                      credentials: grpc.ServerCredentials | None = None) -> AsyncIterator[str]:
    """`fake` serving on `host`, heartbeating to `discovery` as `node_id`, a holder of the layers `stats`
    describe, until the block ends; yields its address."""
    async with serving(lambda server: lgrpc.add_LayerStoreServicer_to_server(fake, server), host=host,
                       credentials=credentials) as address:
        beats = asyncio.create_task(heartbeat_forever(discovery, heartbeat_for(node_id, address, stats)))
        try:
            yield address
        finally:
            beats.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await beats


def heartbeat_for(node_id: str, endpoint: str, stats: list[lpb.StatLayerResponse]) -> dpb.HeartbeatRequest:
    """A heartbeat claiming to hold the layers `stats` describe."""
    return dpb.HeartbeatRequest(
        node_id=node_id, endpoint=endpoint, layer_digests=[s.digest for s in stats],
        layer_stats=[dpb.LayerStat(digest=s.digest, afs_size=s.afs_size, blob_digest=s.blob_digest) for s in stats])
