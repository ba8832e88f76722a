"""Discovery's soft state: which layerstore holds which layers and images, as of its last heartbeat.

A node is known by its node id (with mutual TLS, the name its certificate proves), and an endpoint
belongs to one live node at a time: a heartbeat claiming an endpoint another live node holds is refused
(`owner_of`), so nobody can overwrite or shadow a real node's record. Each heartbeat replaces the node's
whole record (so a node that evicted a layer stops being listed for it at once), and a node whose last
heartbeat is older than the TTL disappears from every answer. Nothing is persisted: a restarted discovery replica is complete again
after one heartbeat period, because every layerstore heartbeats every replica.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field


@dataclass
class NodeRecord:
    node_id: str
    endpoint: str
    last_seen: float            # monotonic clock, for expiry
    last_seen_unix: int         # wall clock, for display
    layers: dict[str, tuple[int, str]] = field(default_factory=dict)  # digest -> (afs size, blob digest)
    cached_images: frozenset[str] = frozenset()
    pulling_images: frozenset[str] = frozenset()
    pulling_layers: frozenset[str] = frozenset()
    cache_max_bytes: int = 0


class NodeTable:
    """Live layerstores and the indexes discovery answers from."""

    def __init__(self, ttl: float = 30.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl = ttl
        self._clock = clock
        self._nodes: dict[str, NodeRecord] = {}

    def update(self, record: NodeRecord) -> None:
        """Replace `record.node_id`'s record (check `owner_of(record.endpoint)` first)."""
        self._nodes[record.node_id] = record

    def owner_of(self, endpoint: str) -> str | None:
        """The live node id whose record has `endpoint`, if any."""
        self.expire()
        return next((node.node_id for node in self._nodes.values() if node.endpoint == endpoint), None)

    def expire(self) -> list[str]:
        """Forget nodes not heard from within the TTL; return their endpoints."""
        deadline = self._clock() - self.ttl
        gone = [node_id for node_id, node in self._nodes.items() if node.last_seen < deadline]
        return [self._nodes.pop(node_id).endpoint for node_id in gone]

    def now(self) -> float:
        return self._clock()

    def live(self) -> list[NodeRecord]:
        self.expire()
        return sorted(self._nodes.values(), key=lambda n: (n.node_id, n.endpoint))

    def holding_layer(self, digest: str) -> list[NodeRecord]:
        return [n for n in self.live() if digest in n.layers]

    def pulling_layer(self, digest: str) -> list[NodeRecord]:
        return [n for n in self.live() if digest in n.pulling_layers and digest not in n.layers]

    def holding_image(self, key: str, layers: Iterable[str] = ()) -> list[NodeRecord]:
        """Nodes that advertise the image, or hold every one of `layers` (its known layer list)."""
        wanted = list(layers)
        return [n for n in self.live()
                if key in n.cached_images or (wanted and all(d in n.layers for d in wanted))]

    def pulling_image(self, key: str) -> list[NodeRecord]:
        return [n for n in self.live() if key in n.pulling_images and key not in n.cached_images]
