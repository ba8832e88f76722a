"""`afsproxy.v1.AfsProxy` over gRPC: the Status stream and ReconcileImageReplica."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import grpc

from afsd.api import afsproxy_pb2 as pb
from afsd.api import afsproxy_pb2_grpc as pb_grpc
from afsd.proxy.backends import BackendChannels
from afsd.proxy.config import ProxyConfig
from afsd.proxy.errors import ProxyError
from afsd.proxy.reconcile import Reconciler
from afsd.proxy.status import status_stream
from afsd.rpc import ChannelPool, refuse


class AfsProxyService(pb_grpc.AfsProxyServicer):
    def __init__(self, config: ProxyConfig, channels: ChannelPool, backends: BackendChannels) -> None:
        self.config = config
        self.channels = channels
        self.backends = backends
        self.reconciler = Reconciler(config, channels)

    async def Status(self, request: pb.StatusRequest,
                     context: grpc.aio.ServicerContext) -> AsyncIterator[pb.StatusResponse]:
        async for frame in status_stream(request, self.config, self.channels, self.backends):
            yield frame

    async def ReconcileImageReplica(self, request: pb.ReconcileImageReplicaRequest,
                                    context: grpc.aio.ServicerContext) -> pb.ReconcileImageReplicaResponse:
        remaining = context.time_remaining()
        try:
            return await self.reconciler.reconcile(
                request, None if remaining is None else time.monotonic() + remaining)
        except ProxyError as error:
            await refuse(context, error.code, str(error))
