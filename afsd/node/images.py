"""From an image reference to the blobs a mount needs: resolve through discovery, make sure some
layerstore holds every layer (asking one to pull when nobody does), and describe each layer's blob.

The result is one `BlobSpec` per layer, bottom first, with the providers that hold exactly that blob
(the same blob digest: nodes running another converter have other bytes and are left out).

Every answer is checked where it enters (afsd.cluster.peer_answers, via the discovery client and
`LayerStorePeer.stat_layer`): the blob description a mount uses comes from the first provider whose
StatLayer is about the layer asked for, well formed, made from the image config's diff_id and (with
TLS) exactly what the converting layerstore signed (afsd.trust.descriptors). A provider that fails any
check is logged by name and skipped, as if it were down.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

import grpc

from afsd import phases
from afsd.api import discovery_pb2 as dpb
from afsd.api import layerstore_pb2 as lpb
from afsd.cluster.discovery_client import DiscoveryClient, DiscoveryUnavailableError
from afsd.cluster.keys import image_key
from afsd.cluster.layerstore import rendezvous_order
from afsd.cluster.peer_answers import PeerAnswerError, check_pulled
from afsd.cluster.peers import LayerStorePeer, blob_spec_from_stat
from afsd.errors import AfsdError, NotFoundError, RegistryError
from afsd.oci.platform import Platform
from afsd.oci.reference import ImageReference
from afsd.ondemand.spec import BlobSpec
from afsd.retry import RetryPolicy, grpc_permanent, grpc_retry_soon
from afsd.rpc import ChannelPool
from afsd.trust.descriptors import BlobTrust

log = logging.getLogger(__name__)

PULL_TIMEOUT = 20 * 60.0
# When every candidate layerstore failed retryably (UNAVAILABLE: restarting, say), wait and ask them again.
PULL_RETRY = RetryPolicy(attempts=3, base=0.5, cap=5.0)


class ImageUnavailableError(AfsdError):
    """No layerstore has the image and none could pull it."""


class HoldersUnreachableError(ImageUnavailableError):
    """No holder discovery listed for a layer gave a StatLayer answer (its call failed, whatever the code);
    a holder whose answer was refused as wrong is not this."""


@dataclass(frozen=True)
class ResolvedMount:
    key: str
    reference: ImageReference
    manifest_digest: str
    layers: list[BlobSpec]  # bottom first


def _grpc_to_error(error: grpc.aio.AioRpcError, what: str) -> AfsdError:
    """Keep the meaning of a remote failure: NOT_FOUND stays a not-found, and so on."""
    message = f"{what}: {error.details() or error.code().name}"
    if error.code() == grpc.StatusCode.NOT_FOUND:
        return NotFoundError(message)
    if error.code() == grpc.StatusCode.INVALID_ARGUMENT:
        return AfsdError(message)
    return RegistryError(message) if error.code() == grpc.StatusCode.PERMISSION_DENIED else ImageUnavailableError(message)


class ImageLocator:
    def __init__(self, discovery: DiscoveryClient, channels: ChannelPool, *, local_layerstore: str | None = None,
                 node_id: str = "", pinned_ttl: float = 60.0, trust: BlobTrust | None = None) -> None:
        """`trust`: verifies each StatLayer answer against the converter's signed descriptor (dev mode,
        the default: only form, bounds and the diff_id are checked)."""
        self.trust = trust or BlobTrust(None)
        self.discovery = discovery
        self.channels = channels
        self.local_layerstore = local_layerstore
        self.node_id = node_id
        self.pinned_ttl = pinned_ttl
        self._pinned: dict[str, tuple[float, ResolvedMount]] = {}

    async def locate(self, reference: ImageReference, platform: Platform) -> ResolvedMount:
        """The image's layers as mountable blobs. A digest-pinned image's answer is reused for
        `pinned_ttl` seconds (its layers cannot change; providers are only a hint, which the range
        fetchers refresh from discovery themselves): repeated executions skip the round trips."""
        if not reference.digest:
            return await self._locate(reference, platform)
        key = image_key(reference, platform)
        cached = self._pinned.get(key)
        if cached is not None and time.monotonic() - cached[0] < self.pinned_ttl:
            return cached[1]
        located = await self._locate(reference, platform)
        self._pinned[key] = (time.monotonic(), located)
        if len(self._pinned) > 512:
            self._pinned.pop(next(iter(self._pinned)))
        return located

    async def _resolve(self, reference: ImageReference, platform: Platform) -> dpb.ResolveImageResponse:
        request = dpb.ResolveImageRequest(image=str(reference), platform_os=platform.os,
                                          platform_arch=platform.architecture, platform_variant=platform.variant)
        try:
            return await self.discovery.resolve_image(request)
        except grpc.aio.AioRpcError as error:
            raise _grpc_to_error(error, f"cannot resolve {reference}") from None
        except DiscoveryUnavailableError as error:
            raise ImageUnavailableError(f"cannot resolve {reference}: {error}") from None

    async def locate_layer(self, reference: ImageReference, platform: Platform, digest: str) -> tuple[str, BlobSpec]:
        """(manifest digest, blob) of one layer of the image, for a client that stacks layers itself: only
        this layer needs a provider (a layerstore pulls the image when none holds it)."""
        resolved = await self._resolve(reference, platform)
        layer = next((layer for layer in resolved.layers if layer.digest == digest), None)
        if layer is None:
            raise NotFoundError(f"{digest} is not a layer of {reference}")
        holders = await self._holders(digest)
        if not holders:
            puller, _ = await self._pull_somewhere(reference, platform)
            holders = [_holder(puller, digest)]
        (spec,) = await self._specs([layer], {digest: holders}, reference, platform)
        return resolved.manifest_digest, spec

    async def _locate(self, reference: ImageReference, platform: Platform) -> ResolvedMount:
        with phases.phase("locate.resolve"):
            resolved = await self._resolve(reference, platform)
        digests = [layer.digest for layer in resolved.layers]
        with phases.phase("locate.providers"):   # one FindProvider per layer, all at once
            holders = dict(zip(digests, await asyncio.gather(*(self._holders(digest) for digest in digests))))
        if any(not nodes for nodes in holders.values()):
            puller, pulled = await self._pull_somewhere(reference, platform)
            # The puller holds every layer now, even before its next heartbeat reaches discovery.
            for layer in pulled.layers:
                if layer.digest in holders and all(n.endpoint != puller for n in holders[layer.digest]):
                    holders[layer.digest].append(dpb.ServiceInstance(
                        endpoint=puller, layer_digests=[layer.digest],
                        layer_stats=[dpb.LayerStat(digest=layer.digest, afs_size=layer.afs_size,
                                                   blob_digest=layer.blob_digest)]))
        with phases.phase("locate.stat"):
            specs = await self._specs(list(resolved.layers), holders, reference, platform)
        return ResolvedMount(image_key(reference, platform), reference, resolved.manifest_digest, specs)

    async def _specs(self, layers: list[dpb.ImageLayer], holders: dict[str, list[dpb.ServiceInstance]],
                     reference: ImageReference, platform: Platform) -> list[BlobSpec]:
        """Each layer's blob from its holders. Discovery lists a node that died until its heartbeat
        expires: when none of a layer's holders answers at all, a layerstore pulls the image (once for
        every such layer), as if nobody held it."""
        specs: dict[str, BlobSpec] = {}
        unreachable: list[dpb.ImageLayer] = []

        async def stat(layer: dpb.ImageLayer) -> None:
            try:
                specs[layer.digest] = await self._spec(layer.digest, layer.diff_id, holders[layer.digest], reference)
            except HoldersUnreachableError as error:
                log.warning("%s; asking a layerstore to pull %s instead", error, reference)
                unreachable.append(layer)

        try:   # every layer's StatLayer at once: a mount waits for one round trip, not one per layer
            async with asyncio.TaskGroup() as group:
                for layer in layers:
                    group.create_task(stat(layer))
        except BaseExceptionGroup as failure:
            raise failure.exceptions[0] from None
        if unreachable:
            puller, _ = await self._pull_somewhere(reference, platform)
            for layer in unreachable:
                specs[layer.digest] = await self._spec(layer.digest, layer.diff_id, [_holder(puller, layer.digest)],
                                                       reference)
        return [specs[layer.digest] for layer in layers]

    async def _holders(self, digest: str) -> list[dpb.ServiceInstance]:
        try:
            return await self.discovery.find_provider(digest, requester=self.local_layerstore or "")
        except (DiscoveryUnavailableError, grpc.aio.AioRpcError) as error:
            log.warning("cannot ask discovery who holds %s: %s", digest, error)
            return []

    async def _pull_somewhere(self, reference: ImageReference, platform: Platform) -> tuple[str, lpb.PullImageResponse]:
        """Ask a layerstore to pull the image: this node's own first, then the others."""
        candidates: list[str] = [self.local_layerstore] if self.local_layerstore else []
        try:
            everyone = await self.discovery.list_nodes()
        except (DiscoveryUnavailableError, grpc.aio.AioRpcError):
            everyone = []
        candidates += [n.endpoint for n in rendezvous_order(reference.key, everyone) if n.endpoint not in candidates]
        if not candidates:
            raise ImageUnavailableError(f"no layerstore is registered in discovery to pull {reference}")
        request = lpb.PullImageRequest(image=str(reference), platform_os=platform.os,
                                       platform_arch=platform.architecture, platform_variant=platform.variant)
        failures: dict[str, str] = {}
        async for _ in PULL_RETRY.rounds():
            worth_another_round = False
            for endpoint in candidates:
                try:
                    log.info("asking layerstore %s to pull %s", endpoint, reference)
                    stub = LayerStorePeer(endpoint, self.channels).stub
                    pulled = await stub.PullImage(request, timeout=PULL_TIMEOUT)
                    check_pulled(pulled.layers, peer=f"layerstore {endpoint}")
                    return endpoint, pulled
                except PeerAnswerError as error:
                    log.warning("ignoring the PullImage answer of %s", error)
                    failures[endpoint] = error.problem
                except grpc.aio.AioRpcError as error:
                    if grpc_permanent(error.code()):  # the image itself is the problem: no use asking others
                        raise _grpc_to_error(error, f"cannot pull {reference}") from None
                    failures[endpoint] = f"{error.code().name} {error.details()}"
                    worth_another_round |= grpc_retry_soon(error.code())
            if not worth_another_round:
                break
        raise ImageUnavailableError(f"no layerstore could pull {reference}: " + "; ".join(
            f"{endpoint}: {reason}" for endpoint, reason in failures.items()))

    async def _spec(self, digest: str, diff_id: str, holders: list[dpb.ServiceInstance],
                    reference: ImageReference) -> BlobSpec:
        """The blob description of the first holder whose StatLayer passes every check; the holders
        advertising that same blob are the spec's providers."""
        if not holders:
            raise ImageUnavailableError(f"layer {digest} of {reference} is on no layerstore, even after a pull")
        endpoints = list(dict.fromkeys(n.endpoint for n in holders))
        if self.local_layerstore in endpoints:
            endpoints.remove(self.local_layerstore)
            endpoints.insert(0, self.local_layerstore)
        errors, answered = [], False
        for endpoint in endpoints:
            try:
                stat = await LayerStorePeer(endpoint, self.channels).stat_layer(digest, diff_id=diff_id,
                                                                                trust=self.trust)
            except grpc.aio.AioRpcError as error:
                errors.append(f"{endpoint}: {error.code().name}")
                continue
            except PeerAnswerError as error:
                log.warning("layer %s: not using the StatLayer answer of %s", digest, error)
                errors.append(str(error))
                answered = True
                continue
            advertised = {n.endpoint: _advertised_blob(n, digest) for n in holders}
            providers = tuple(e for e in endpoints if advertised.get(e) in ("", stat.blob_digest))
            return blob_spec_from_stat(stat, providers)
        error_type = ImageUnavailableError if answered else HoldersUnreachableError
        raise error_type(f"no provider of layer {digest} gave a usable StatLayer answer: " + "; ".join(errors))


def _holder(endpoint: str, digest: str) -> dpb.ServiceInstance:
    """A layerstore that has just pulled layer `digest`, as a holder (before discovery lists it)."""
    return dpb.ServiceInstance(endpoint=endpoint, layer_digests=[digest])


def _advertised_blob(node: dpb.ServiceInstance, digest: str) -> str:
    """The blob digest `node`'s heartbeat gave for layer `digest` ("" when it did not say): a hint only."""
    return next((s.blob_digest for s in node.layer_stats if s.digest == digest), "")
