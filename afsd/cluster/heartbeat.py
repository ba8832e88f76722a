"""The layerstore's heartbeat loop: tell every discovery replica what this node holds.

It beats once at start, then every `period` seconds, and at once whenever the node's contents change
(a layer landed, a layer was evicted, a pull started or ended); bursts of changes coalesce into one beat.
"""

from __future__ import annotations

import asyncio
import logging

from afsd.cluster.discovery_client import DiscoveryClient
from afsd.cluster.layerstore import LayerStoreNode

log = logging.getLogger(__name__)


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
