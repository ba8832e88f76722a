"""The layerstore's heartbeat loop: tell every discovery replica what this node holds.

It beats once at start, then every `period` seconds, and at once whenever the node's contents change
(a layer landed, a layer was evicted, a pull started or ended); bursts of changes coalesce into one beat.
On a graceful stop, `leave` sends one last beat that holds nothing and says the node leaves, so discovery
forgets the node at once instead of when its heartbeat expires (every mount or pull in between would try
it first and fail over).
"""

from __future__ import annotations

import asyncio
import logging

from afsd.api import discovery_pb2
from afsd.cluster.discovery_client import DiscoveryClient
from afsd.cluster.layerstore import LayerStoreNode

log = logging.getLogger(__name__)

LEAVE_TIMEOUT = 2.0   # a stop waits at most this long for discovery to hear that we leave


async def heartbeat_forever(node: LayerStoreNode, discovery: DiscoveryClient, period: float = 10.0) -> None:
    while True:
        node.changed.clear()
        accepted = await discovery.heartbeat(node.heartbeat_request())
        if accepted == 0:
            log.warning("no discovery replica accepted our heartbeat (%s)", ", ".join(discovery.endpoints))
        try:
            await asyncio.wait_for(node.changed.wait(), period)
        except asyncio.TimeoutError:
            pass


async def leave(node: LayerStoreNode, discovery: DiscoveryClient, beats: asyncio.Task[None] | None,
                timeout: float = LEAVE_TIMEOUT) -> None:
    """Stop `beats` (the `heartbeat_forever` task), then tell every replica we leave.

    Best effort within `timeout`: a replica that does not hear it lists us until our last full heartbeat
    expires, as after a crash. The beat also holds nothing: a discovery that ignores `leaving` keeps our
    record, empty, until then (each heartbeat replaces the node's whole record).
    """
    if beats is not None:
        beats.cancel()   # a full beat sent after the empty one would list our layers again
        await asyncio.gather(beats, return_exceptions=True)
    empty = discovery_pb2.HeartbeatRequest(node_id=node.node_id, endpoint=node.endpoint,
                                           cache_max_bytes=node.store.limit, leaving=True)
    try:
        accepted = await asyncio.wait_for(discovery.heartbeat(empty), timeout)
    except asyncio.TimeoutError:
        log.warning("discovery (%s) did not hear within %.1fs that we leave; it lists us until our heartbeat "
                    "expires", ", ".join(discovery.endpoints), timeout)
        return
    log.info("told %d discovery replica(s) that we leave", accepted)
