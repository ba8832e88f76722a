"""`AfsProxy.ReconcileImageReplica`: make every layer of an image present on at least N layerstores.

The image is resolved by discovery (with a long timeout: discovery may have to ask a slow registry,
which is not a reason to fail); the layerstores and what they hold come from every discovery replica.
Missing copies are planned by reconcile_plan.py and asked for with the layerstores' own `EnsureLayers`,
which copies a layer from a layerstore holding it (verified chunk by chunk) and goes to the registry only
when no peer has it. The proxy then waits (bounded) until discovery lists the new copies, so that what
it returns is what the cluster now reports.
"""

from __future__ import annotations

import asyncio
import logging
import time

import grpc

from afsd.api import afsproxy_pb2 as pb
from afsd.api import discovery_pb2 as dpb
from afsd.api import layerstore_pb2 as lpb
from afsd.api import layerstore_pb2_grpc as lgrpc
from afsd.cluster.discovery_client import DiscoveryClient, DiscoveryUnavailableError
from afsd.proxy.config import ProxyConfig
from afsd.proxy.discovery_view import DiscoveryView, discovery_view
from afsd.proxy.errors import ProxyError, TargetResolveError
from afsd.proxy.reconcile_plan import current_replica, holders, plan
from afsd.proxy.targets import resolve_target
from afsd.rpc import ChannelPool

log = logging.getLogger(__name__)

POLL_PERIOD = 0.25


def _error(message: str, code: grpc.StatusCode) -> ProxyError:
    return ProxyError(message, code)


class Reconciler:
    def __init__(self, config: ProxyConfig, channels: ChannelPool) -> None:
        self.config = config
        self.channels = channels

    async def reconcile(self, request: pb.ReconcileImageReplicaRequest,
                        deadline: float | None = None) -> pb.ReconcileImageReplicaResponse:
        if not request.image.strip():
            raise _error("image is required", grpc.StatusCode.INVALID_ARGUMENT)
        if request.replica < 0:
            raise _error(f"replica must be >= 0 (got {request.replica})", grpc.StatusCode.INVALID_ARGUMENT)
        if not self.config.discovery_target:
            raise _error("this proxy has no --discovery-target: it cannot reconcile images",
                         grpc.StatusCode.FAILED_PRECONDITION)
        resolved = await self._resolve(request, deadline)
        layers = sorted({layer.digest: layer for layer in resolved.layers}.values(),
                        key=lambda layer: (-layer.compressed_size, layer.digest))
        view = await self._view()
        targets = plan(layers, view.instances, request.replica)
        copied: dict[str, set[str]] = {}
        if targets:
            log.info("reconcile %s to %d copies: %s", resolved.image_key, request.replica,
                     {endpoint: len(wanted) for endpoint, wanted in targets.items()})
            results = await asyncio.gather(*(self._ensure(endpoint, request, wanted, deadline)
                                              for endpoint, wanted in targets.items()))
            copied = {endpoint: done for endpoint, done in zip(targets, results)}
            view = await self._wait_until_listed(layers, request.replica, copied)
        return self._response(resolved.image_key, layers, view, copied, request.replica)

    async def _resolve(self, request: pb.ReconcileImageReplicaRequest, deadline: float | None) -> dpb.ResolveImageResponse:
        try:
            addresses = await resolve_target(self.config.discovery_target)
        except TargetResolveError as error:
            raise _error(f"no discovery: {error}", grpc.StatusCode.UNAVAILABLE) from None
        timeout = _bounded(self.config.resolve_timeout, deadline)
        try:
            return await DiscoveryClient(addresses, self.channels).resolve_image(dpb.ResolveImageRequest(
                image=request.image, tag=request.tag, platform_os=request.platform_os,
                platform_arch=request.platform_arch, platform_variant=request.platform_variant), timeout=timeout)
        except grpc.aio.AioRpcError as error:  # discovery's answer about the image itself
            raise _error(f"resolve image {request.image}: {error.details()}", error.code()) from None
        except DiscoveryUnavailableError as error:
            raise _error(f"resolve image {request.image}: {error}", grpc.StatusCode.UNAVAILABLE) from None

    async def _view(self) -> DiscoveryView:
        try:
            view = await discovery_view(self.config.discovery_target, self.channels, self.config.status_timeout)
        except TargetResolveError as error:
            raise _error(f"no discovery: {error}", grpc.StatusCode.UNAVAILABLE) from None
        if view.errors and len(view.errors) == view.replicas:
            raise _error("no discovery replica answered: " + "; ".join(view.errors), grpc.StatusCode.UNAVAILABLE)
        return view

    async def _ensure(self, endpoint: str, request: pb.ReconcileImageReplicaRequest, wanted: list[dpb.ImageLayer],
                      deadline: float | None) -> set[str]:
        """Ask one layerstore for its share of the plan; the digests it now holds (none if it failed)."""
        ensure = lpb.EnsureLayersRequest(
            image=request.image, tag=request.tag, platform_os=request.platform_os, platform_arch=request.platform_arch,
            platform_variant=request.platform_variant,
            layers=[lpb.Layer(digest=layer.digest, media_type=layer.media_type, compressed_size=layer.compressed_size,
                              diff_id=layer.diff_id) for layer in wanted])
        try:
            response = await lgrpc.LayerStoreStub(self.channels.get(endpoint)).EnsureLayers(
                ensure, timeout=_bounded(self.config.ensure_timeout, deadline))
        except grpc.aio.AioRpcError as error:
            log.warning("layerstore %s could not take %d layers of %s: %s %s", endpoint, len(wanted), request.image,
                        error.code().name, error.details())
            return set()
        return {layer.digest for layer in response.layers}

    async def _wait_until_listed(self, layers: list[dpb.ImageLayer], replica: int,
                                 copied: dict[str, set[str]]) -> DiscoveryView:
        """Until discovery lists every copy that was made (layerstores heartbeat right after a change)."""
        give_up = time.monotonic() + self.config.replica_wait
        while True:
            view = await self._view()
            listed = {(i.endpoint, digest) for digest, found in holders(layers, view.instances).items() for i in found}
            made = {(endpoint, digest) for endpoint, digests in copied.items() for digest in digests}
            if made <= listed or current_replica(layers, view.instances) >= replica or time.monotonic() > give_up:
                return view
            await asyncio.sleep(POLL_PERIOD)

    @staticmethod
    def _response(image_key: str, layers: list[dpb.ImageLayer], view: DiscoveryView, copied: dict[str, set[str]],
                  replica: int) -> pb.ReconcileImageReplicaResponse:
        node_of = {instance.endpoint: instance.node_id for instance in view.instances}
        placements = []
        copies = []
        for digest, found in holders(layers, view.instances).items():
            targets = {(i.node_id, i.endpoint) for i in found}
            targets |= {(node_of.get(endpoint, ""), endpoint) for endpoint, done in copied.items() if digest in done}
            copies.append(len(targets))
            placements.append(pb.ReconciledLayerPlacement(
                digest=digest, instances=[pb.LayerstoreTarget(node_id=n, endpoint=e) for n, e in sorted(targets)]))
        current = min(copies) if copies else 0
        return pb.ReconcileImageReplicaResponse(image_key=image_key, current_replica=current, requested_replica=replica,
                                                ensured=current >= replica, layers=placements)


def _bounded(timeout: float, deadline: float | None) -> float:
    if deadline is None:
        return timeout
    return max(0.0, min(timeout, deadline - time.monotonic()))
