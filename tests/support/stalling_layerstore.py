"""A stand-in layerstore for faults a real one cannot show on cue (the one fake in the fetcher tests).

`StallingLayerStore` is a tiny in-process `layerstore.v1.LayerStore` gRPC server whose ReadLayer
accepts the call and then holds it until the test opens `gate`:
- never opened, it is a hung peer (the connection works, no byte ever comes);
- with an `upstream` real layerstore, opening the gate relays the held calls to it, which lets a test
  queue requests behind a slow peer and then watch the order they are served in.
Every other RPC answers UNIMPLEMENTED (the generated servicer's default), like an old layerstore
without leases. `calls` counts the ReadLayer calls received.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Self

import grpc

from afsd.api import layerstore_pb2 as pb
from afsd.api import layerstore_pb2_grpc as pb_grpc


class StallingLayerStore(pb_grpc.LayerStoreServicer):
    def __init__(self, upstream: str | None = None) -> None:
        self.upstream = upstream
        self.gate = asyncio.Event()
        self.calls = 0
        self.address = ""
        self._server: grpc.aio.Server | None = None
        self._channel: grpc.aio.Channel | None = None

    async def start(self) -> StallingLayerStore:
        self._server = grpc.aio.server()
        pb_grpc.add_LayerStoreServicer_to_server(self, self._server)
        port = self._server.add_insecure_port("127.0.0.1:0")
        await self._server.start()
        self.address = f"127.0.0.1:{port}"
        if self.upstream:
            self._channel = grpc.aio.insecure_channel(self.upstream)
        return self

    async def stop(self) -> None:
        if self._server is not None:
            await self._server.stop(0)
        if self._channel is not None:
            await self._channel.close()

    async def __aenter__(self) -> Self:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def ReadLayer(self, request: pb.ReadLayerRequest,
                        context: grpc.aio.ServicerContext) -> AsyncIterator[pb.ReadLayerResponse]:
        self.calls += 1
        await self.gate.wait()
        if self._channel is None:
            await asyncio.Event().wait()  # a hung peer stays hung
        async for message in pb_grpc.LayerStoreStub(self._channel).ReadLayer(request):
            yield message

    async def _unimplemented(self, request: object, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "this layerstore has no layer leases")

    AcquireLayerLease = RenewLayerLease = ReleaseLayerLease = _unimplemented
