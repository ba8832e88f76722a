"""Image configs from the cluster: a layerstore that pulled an image keeps its config blob and serves it
(`LayerStore.ReadImageConfig`), so discovery and other layerstores ask it before the registry.

Plugged into the registry client as a `ConfigSource` (afsd/oci/client.py). Which layerstores are worth
asking is the caller's knowledge (discovery: its node table; a layerstore: discovery's `FindProvider`):
nodes that hold every layer of the image, since they pulled it. Their answers are hostile input: bytes
that are not exactly the blob the manifest names are dropped and the next holder asked.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import grpc

from afsd.api import layerstore_pb2 as pb
from afsd.api import layerstore_pb2_grpc as pb_grpc
from afsd.oci.digest import is_blob
from afsd.rpc import ChannelPool

log = logging.getLogger(__name__)

# A config is a few KiB; a holder that cannot answer at once is skipped for the next (or the registry).
ASK_TIMEOUT = 5.0
MAX_HOLDERS_ASKED = 3
# Configs larger than this are not passed around the cluster (a gRPC message holds 4 MiB); the registry serves them.
MAX_SHARED_CONFIG = 2 * 1024 * 1024

# `layer digests of the image -> endpoints of layerstores that hold all of them`
HolderLookup = Callable[[list[str]], Awaitable[list[str]]]


class ClusterConfigSource:
    """Asks up to `MAX_HOLDERS_ASKED` layerstores holding an image's layers for its config blob."""

    def __init__(self, holders: HolderLookup, channels: ChannelPool) -> None:
        self._holders = holders
        self._channels = channels

    async def fetch_config(self, digest: str, size: int, layer_digests: list[str]) -> bytes | None:
        if not layer_digests or size > MAX_SHARED_CONFIG:
            return None
        for endpoint in (await self._holders(layer_digests))[:MAX_HOLDERS_ASKED]:
            stub = pb_grpc.LayerStoreStub(self._channels.get(endpoint))
            try:
                answer = await stub.ReadImageConfig(pb.ReadImageConfigRequest(digest=digest), timeout=ASK_TIMEOUT)
            except grpc.aio.AioRpcError as error:
                if error.code() != grpc.StatusCode.NOT_FOUND:
                    log.info("layerstore %s could not give config %s: %s", endpoint, digest, error.code().name)
                continue
            if is_blob(answer.data, digest, size):
                log.info("config %s came from layerstore %s, not the registry", digest, endpoint)
                return answer.data
            log.warning("layerstore %s answered config %s with other bytes (%d, expected %d); ignoring them",
                        endpoint, digest, len(answer.data), size)
        return None

