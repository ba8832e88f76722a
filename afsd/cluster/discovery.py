"""`afsd discovery`: the control plane (`discovery.v1.ServiceDiscovery`).

Layerstores heartbeat their contents here; mounts and layerstores ask which nodes hold an image or a
layer; afslet and the proxy resolve image references (with runtime config) through `ResolveImage`.
State is soft (see nodetable.py). Several replicas may run side by side: they share nothing, and
answer alike because every layerstore heartbeats every replica.

Differences from the reference AFS, on purpose: image keys are normalised (`alpine` is
`docker.io/library/alpine:latest`), resolutions of tags expire (see resolver.py), and the answers can
include nodes that are pulling a layer right now (`include_pulling`), which lets a layerstore wait for
a peer's pull instead of starting its own. It also keeps what tasks read first from each blob
(`ReportAccessTrace`, `GetAccessTraces`: trace_book.py), for nodes to prefetch.
"""

from __future__ import annotations

import asyncio
import logging
import time

import grpc

from afsd.api import discovery_pb2 as pb
from afsd.api import discovery_pb2_grpc as pb_grpc
from afsd.cluster.answers import PageTokenError, Query, page
from afsd.cluster.configs import MAX_SHARED_CONFIG, HolderLookup
from afsd.cluster.keys import image_key, normalise_image_key
from afsd.cluster.nodetable import NodeRecord, NodeTable
from afsd.cluster.peer_answers import MAX_LAYERS, PeerAnswerError, check_heartbeat, check_trace_report
from afsd.cluster.resolver import ImageResolver
from afsd.cluster.trace_book import TraceBook
from afsd.errors import AfsdError, InvalidReferenceError
from afsd.oci.platform import parse_platform
from afsd.oci.reference import parse_reference
from afsd.rpc import abort_for, refuse
from afsd.trust.identity import identity_of

log = logging.getLogger(__name__)


def _query(request: pb.FindProviderRequest | pb.FindImageProviderRequest | pb.FindImageRequest,
           **about: object) -> Query:
    return Query(view=request.view, max_services=request.max_services, page_token=request.page_token.strip(),
                 requester=request.requester_endpoint.strip(), **about)  # type: ignore[arg-type]


def _valid_keys(keys: list[str], endpoint: str) -> frozenset[str]:
    result = set()
    for key in keys:
        try:
            result.add(normalise_image_key(key))
        except InvalidReferenceError:
            log.warning("heartbeat from %s: ignoring unparsable image key %r", endpoint, key)
    return frozenset(result)


class DiscoveryService(pb_grpc.ServiceDiscoveryServicer):
    def __init__(self, table: NodeTable, resolver: ImageResolver, *, authenticated: bool = False,
                 traces: TraceBook | None = None) -> None:
        """`authenticated`: served over mutual TLS; a heartbeat may then speak only for the node its
        caller's certificate names, at an endpoint on one of the certificate's hosts (and a trace report
        is the certificate's node's)."""
        self.table = table
        self.resolver = resolver
        self.authenticated = authenticated
        self.traces = traces or TraceBook()

    async def Heartbeat(self, request: pb.HeartbeatRequest, context: grpc.aio.ServicerContext) -> pb.HeartbeatResponse:
        if not request.node_id.strip() or not request.endpoint.strip():
            await refuse(context, grpc.StatusCode.INVALID_ARGUMENT, "heartbeat needs node_id and endpoint")
        try:
            check_heartbeat(request, peer=f"heartbeat from {context.peer()}")
        except PeerAnswerError as error:
            await refuse(context, grpc.StatusCode.INVALID_ARGUMENT, str(error))
        refusal = self._heartbeat_refusal(request, context)
        if refusal:
            log.warning("refused a heartbeat from %s: %s", context.peer(), refusal)
            await refuse(context, grpc.StatusCode.PERMISSION_DENIED, refusal)
        if request.leaving:
            if self.table.remove(request.node_id) is not None:
                log.info("node %s (%s) left", request.node_id, request.endpoint)
            return pb.HeartbeatResponse(expires_in_seconds=0)
        layers: dict[str, tuple[int, str]] = {d: (0, "") for d in request.layer_digests}
        for stat in request.layer_stats:
            layers[stat.digest] = (stat.afs_size, stat.blob_digest)
        self.table.update(NodeRecord(
            node_id=request.node_id, endpoint=request.endpoint, last_seen=self.table.now(),
            last_seen_unix=int(time.time()), layers=layers,
            cached_images=_valid_keys(list(request.cached_images), request.endpoint),
            pulling_images=_valid_keys(list(request.pulling_images), request.endpoint),
            pulling_layers=frozenset(request.pulling_layers), cache_max_bytes=request.cache_max_bytes))
        return pb.HeartbeatResponse(expires_in_seconds=int(self.table.ttl))

    def _heartbeat_refusal(self, request: pb.HeartbeatRequest, context: grpc.aio.ServicerContext) -> str | None:
        """Why this caller may not send this heartbeat, or None."""
        if self.authenticated:
            identity = identity_of(context)
            if identity is None or identity.name != request.node_id:
                return f"the certificate of {identity.name if identity else 'nobody'} cannot heartbeat for node " \
                       f"{request.node_id!r}"
            host = request.endpoint.rpartition(":")[0]
            if not identity.covers_host(host):
                return (f"endpoint {request.endpoint} is not on a host of node {identity.name}'s certificate "
                        f"({', '.join(sorted(identity.hosts)) or 'none'})")
        owner = self.table.owner_of(request.endpoint)
        if owner is not None and owner != request.node_id:
            return f"endpoint {request.endpoint} belongs to live node {owner!r}, not {request.node_id!r}"
        return None

    async def _key(self, text: str, context: grpc.aio.ServicerContext) -> str:
        try:
            return normalise_image_key(text)
        except InvalidReferenceError as error:
            await abort_for(context, error)

    def _image_layers(self, key: str) -> tuple[str, ...]:
        known = self.resolver.cached(key)
        return tuple(layer.digest for layer in known.layers) if known else ()

    def _image_nodes(self, key: str, include_pulling: bool) -> list[NodeRecord]:
        nodes = self.table.holding_image(key, self._image_layers(key))
        if include_pulling:
            nodes += self.table.pulling_image(key)
        return nodes

    async def _page(self, nodes: list[NodeRecord], query: Query,
                    context: grpc.aio.ServicerContext) -> tuple[list[pb.ServiceInstance], str, int]:
        try:
            return page(nodes, query)
        except (PageTokenError, ValueError) as error:
            await refuse(context, grpc.StatusCode.INVALID_ARGUMENT, str(error))

    async def FindImageProvider(self, request: pb.FindImageProviderRequest,
                                context: grpc.aio.ServicerContext) -> pb.FindImageProviderResponse:
        if not request.image_key.strip():
            await refuse(context, grpc.StatusCode.INVALID_ARGUMENT, "image_key is required")
        key = await self._key(request.image_key, context)
        services, token, total = await self._page(self._image_nodes(key, request.include_pulling), _query(
            request, image_key=key, image_layers=self._image_layers(key)), context)
        return pb.FindImageProviderResponse(image_key=key, services=services, next_page_token=token,
                                            total_services=total)

    async def FindProvider(self, request: pb.FindProviderRequest,
                           context: grpc.aio.ServicerContext) -> pb.FindProviderResponse:
        digest = request.layer_digest.strip().lower()
        if not digest:
            nodes = self.table.live()
        else:
            nodes = self.table.holding_layer(digest)
            if request.include_pulling:
                nodes += self.table.pulling_layer(digest)
        services, token, total = await self._page(nodes, _query(request, layer_digest=digest), context)
        return pb.FindProviderResponse(layer_digest=digest, services=services, next_page_token=token,
                                       total_services=total)

    async def FindImage(self, request: pb.FindImageRequest,
                        context: grpc.aio.ServicerContext) -> pb.FindImageResponse:
        key_text, digest = request.image_key.strip(), request.layer_digest.strip().lower()
        key = await self._key(key_text, context) if key_text else ""
        if not key and not digest:
            nodes = self.table.live()
        else:
            nodes = self._image_nodes(key, False) if key else self.table.holding_layer(digest)
        if key and digest:
            holders = {n.endpoint for n in self.table.holding_layer(digest)}
            nodes = [n for n in nodes if n.endpoint in holders]
        layers = self._image_layers(key) if key else ()
        query = _query(request, image_key=key, layer_digest="" if key else digest,
                       image_layers=tuple(dict.fromkeys((*layers, digest) if digest else layers)))
        services, token, total = await self._page(nodes, query, context)
        return pb.FindImageResponse(image_key=key, services=services, next_page_token=token, total_services=total)

    async def ResolveImage(self, request: pb.ResolveImageRequest,
                           context: grpc.aio.ServicerContext) -> pb.ResolveImageResponse:
        if not request.image.strip():
            await refuse(context, grpc.StatusCode.INVALID_ARGUMENT, "image is required")
        try:
            reference = parse_reference(request.image, request.tag or None)
            platform = parse_platform(os=request.platform_os or "linux",
                                      architecture=request.platform_arch or "amd64",
                                      variant=request.platform_variant)
            image = await self.resolver.resolve(reference, platform, force_refresh=request.force_refresh)
        except AfsdError as error:
            await abort_for(context, error)
            raise
        config = image.config
        diff_ids = config.diff_ids if len(config.diff_ids) == len(image.layers) else [""] * len(image.layers)
        return pb.ResolveImageResponse(
            image_key=image_key(reference, platform), resolved_registry=reference.registry,
            resolved_repository=reference.repository, resolved_reference=reference.manifest_reference,
            manifest_digest=image.manifest_digest,
            layers=[pb.ImageLayer(digest=layer.digest, media_type=layer.media_type,
                                  compressed_size=layer.size, diff_id=diff_id)
                    for layer, diff_id in zip(image.layers, diff_ids)],
            runtime_config=pb.ImageRuntimeConfig(entrypoint=config.entrypoint, cmd=config.cmd,
                                                 env=config.env, working_dir=config.working_dir,
                                                 user=config.user),
            config_digest=image.config_digest,
            config=image.config_blob if len(image.config_blob) <= MAX_SHARED_CONFIG else b"")


    async def ReportAccessTrace(self, request: pb.ReportAccessTraceRequest,
                                context: grpc.aio.ServicerContext) -> pb.ReportAccessTraceResponse:
        try:
            ranges = check_trace_report(request, peer=f"trace report from {context.peer()}")
        except PeerAnswerError as error:
            await refuse(context, grpc.StatusCode.INVALID_ARGUMENT, str(error))
        advertised = (request.blob_size, request.blob_digest)
        if not any(node.layers.get(request.layer_digest) == advertised
                   for node in self.table.holding_layer(request.layer_digest)):
            await refuse(context, grpc.StatusCode.FAILED_PRECONDITION,
                         f"no live layerstore advertises layer {request.layer_digest} as blob "
                         f"{request.blob_digest} of {request.blob_size} bytes")
        identity = identity_of(context) if self.authenticated else None
        node = identity.name if identity is not None else request.node_id or context.peer()
        runs = self.traces.report(request.blob_digest, request.blob_size, node, request.manifest_digest, ranges)
        log.info("access trace of blob %s from %s: %d ranges (%d runs kept)", request.blob_digest, node,
                 len(ranges), runs)
        return pb.ReportAccessTraceResponse(runs=runs)

    async def GetAccessTraces(self, request: pb.GetAccessTracesRequest,
                              context: grpc.aio.ServicerContext) -> pb.GetAccessTracesResponse:
        if len(request.blob_digests) > MAX_LAYERS:
            await refuse(context, grpc.StatusCode.INVALID_ARGUMENT, f"at most {MAX_LAYERS} blobs per request")
        digests = dict.fromkeys(digest.strip().lower() for digest in request.blob_digests)
        merged = [self.traces.merged(digest, request.manifest_digest.strip()) for digest in digests]
        return pb.GetAccessTracesResponse(traces=[trace for trace in merged if trace is not None])


def config_holders(table: NodeTable) -> HolderLookup:
    """For the registry client's `ClusterConfigSource`: live layerstores holding all of an image's layers."""
    async def holders(layer_digests: list[str]) -> list[str]:
        return [node.endpoint for node in table.holding_layers(layer_digests)]
    return holders


async def expire_periodically(table: NodeTable, period: float = 5.0) -> None:
    while True:
        await asyncio.sleep(period)
        for endpoint in table.expire():
            log.info("node %s expired (no heartbeat for %.0fs)", endpoint, table.ttl)
