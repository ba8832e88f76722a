"""Simulated layerstores for discovery at scale: heartbeat clients, not full nodes. Each holds a fixed
set of layers drawn from a shared pool with a skewed popularity (a few base layers everywhere, a long
tail elsewhere), and heartbeats every discovery replica over real gRPC as a layerstore would.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
from collections.abc import Sequence
from dataclasses import dataclass

import grpc

from afsd.api import discovery_pb2 as pb
from afsd.api import discovery_pb2_grpc as pb_grpc

BASE_LAYERS = 10        # held by every node (the base images everybody runs)
LAYER_POOL = 2000       # the long tail the rest of each node's layers come from


def layer_digest(index: int) -> str:
    return "sha256:" + hashlib.sha256(f"sim-layer-{index}".encode()).hexdigest()


def image_key(index: int) -> str:
    return f"registry.sim/team/image-{index}:v1"


@dataclass(frozen=True)
class FakeLayerstore:
    node_id: str
    endpoint: str
    layers: tuple[int, ...]     # indexes into the pool
    images: tuple[int, ...]

    def heartbeat(self) -> pb.HeartbeatRequest:
        digests = [layer_digest(i) for i in self.layers]
        return pb.HeartbeatRequest(
            node_id=self.node_id, endpoint=self.endpoint, layer_digests=digests,
            layer_stats=[pb.LayerStat(digest=d, afs_size=50_000_000 + 4096 * i,
                                      blob_digest="sha256:" + hashlib.sha256(d.encode()).hexdigest())
                         for i, d in zip(self.layers, digests)],
            cached_images=[image_key(i) for i in self.images], cache_max_bytes=1 << 40)


def fake_layerstores(count: int, layers_per_node: int = 100, seed: int = 17) -> list[FakeLayerstore]:
    """`count` nodes of `layers_per_node` layers: the base layers, then a Zipf-like draw from the pool."""
    rng = random.Random(seed)
    weights = [1.0 / (rank + 1) for rank in range(LAYER_POOL)]
    nodes = []
    for n in range(count):
        chosen = set(range(min(BASE_LAYERS, layers_per_node)))
        while len(chosen) < layers_per_node:
            chosen.update(BASE_LAYERS + i for i in rng.choices(range(LAYER_POOL), weights, k=layers_per_node))
        layers = tuple(sorted(chosen)[:layers_per_node])
        images = tuple(sorted({layer // 10 for layer in layers[BASE_LAYERS:]}))[:10]
        nodes.append(FakeLayerstore(f"sim{n:04d}", f"10.99.{n // 250}.{n % 250 + 1}:50051", layers, images))
    return nodes


async def heartbeat_all(channel: grpc.aio.Channel, nodes: Sequence[FakeLayerstore], *, concurrency: int = 32,
                        timeout: float = 30.0) -> list[float]:
    """One heartbeat from every node (at most `concurrency` at once); the seconds each took."""
    stub = pb_grpc.ServiceDiscoveryStub(channel)
    slots = asyncio.Semaphore(concurrency)
    loop = asyncio.get_running_loop()

    async def one(node: FakeLayerstore) -> float:
        request = node.heartbeat()
        async with slots:
            started = loop.time()
            await stub.Heartbeat(request, timeout=timeout)
            return loop.time() - started

    return list(await asyncio.gather(*(one(node) for node in nodes)))
