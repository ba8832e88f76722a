"""Discovery's soft state: which layerstore holds which layers and images, as of its last heartbeat.

A node is known by its node id (with mutual TLS, the name its certificate proves), and an endpoint
belongs to one live node at a time: a heartbeat claiming an endpoint another live node holds is refused
(`owner_of`), so nobody can overwrite or shadow a real node's record. Each heartbeat replaces the node's
whole record (so a node that evicted a layer stops being listed for it at once), and a node whose last
heartbeat is older than the TTL disappears from every answer. Nothing is persisted: a restarted discovery replica is complete again
after one heartbeat period, because every layerstore heartbeats every replica.

Queries go through indexes (layer → nodes, image → nodes, the same for pulls, endpoint → node), kept
up to date by `update` and `expire`, so a question about one layer costs the nodes that hold it, not a
scan of the whole cluster (1,000 nodes × 100 layers: bench/discovery_bench.py).
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


class _Index:
    """key → node ids, for one kind of key."""

    def __init__(self) -> None:
        self._nodes: dict[str, set[str]] = {}

    def add(self, node_id: str, keys: Iterable[str]) -> None:
        for key in keys:
            self._nodes.setdefault(key, set()).add(node_id)

    def remove(self, node_id: str, keys: Iterable[str]) -> None:
        for key in keys:
            holders = self._nodes.get(key)
            if holders is not None:
                holders.discard(node_id)
                if not holders:
                    del self._nodes[key]

    def get(self, key: str) -> set[str]:
        return self._nodes.get(key, set())


class NodeTable:
    """Live layerstores and the indexes discovery answers from."""

    def __init__(self, ttl: float = 30.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl = ttl
        self._clock = clock
        self._nodes: dict[str, NodeRecord] = {}
        self._by_endpoint: dict[str, str] = {}
        self._layers = _Index()
        self._images = _Index()
        self._pulling_layers = _Index()
        self._pulling_images = _Index()

    def update(self, record: NodeRecord) -> None:
        """Replace `record.node_id`'s record (check `owner_of(record.endpoint)` first)."""
        old = self._nodes.get(record.node_id)
        if old is not None:
            self._unindex(old)
        self._nodes[record.node_id] = record
        self._by_endpoint[record.endpoint] = record.node_id
        self._layers.add(record.node_id, record.layers)
        self._images.add(record.node_id, record.cached_images)
        self._pulling_layers.add(record.node_id, record.pulling_layers)
        self._pulling_images.add(record.node_id, record.pulling_images)

    def remove(self, node_id: str) -> NodeRecord | None:
        """Forget `node_id` now (it said it leaves); its record, if it had one."""
        record = self._nodes.pop(node_id, None)
        if record is not None:
            self._unindex(record)
        return record

    def _unindex(self, record: NodeRecord) -> None:
        if self._by_endpoint.get(record.endpoint) == record.node_id:
            del self._by_endpoint[record.endpoint]
        self._layers.remove(record.node_id, record.layers)
        self._images.remove(record.node_id, record.cached_images)
        self._pulling_layers.remove(record.node_id, record.pulling_layers)
        self._pulling_images.remove(record.node_id, record.pulling_images)

    def owner_of(self, endpoint: str) -> str | None:
        """The live node id whose record has `endpoint`, if any."""
        node_id = self._by_endpoint.get(endpoint)
        if node_id is None or not self._fresh([node_id]):
            return None
        return node_id

    def expire(self) -> list[str]:
        """Forget nodes not heard from within the TTL; return their endpoints."""
        deadline = self._clock() - self.ttl
        gone = [node_id for node_id, node in self._nodes.items() if node.last_seen < deadline]
        for node_id in gone:
            self._unindex(self._nodes[node_id])
        return [self._nodes.pop(node_id).endpoint for node_id in gone]

    def now(self) -> float:
        return self._clock()

    def __len__(self) -> int:
        return len(self._nodes)

    def live(self) -> list[NodeRecord]:
        self.expire()
        return sorted(self._nodes.values(), key=lambda n: (n.node_id, n.endpoint))

    def _fresh(self, node_ids: Iterable[str]) -> list[NodeRecord]:
        """The records of `node_ids` heard from within the TTL (expired ones go at the next `expire`)."""
        deadline = self._clock() - self.ttl
        found = (self._nodes[n] for n in node_ids if n in self._nodes)
        return [n for n in found if n.last_seen >= deadline]  # unordered: answers.page orders them

    def holding_layer(self, digest: str) -> list[NodeRecord]:
        return self._fresh(self._layers.get(digest))

    def pulling_layer(self, digest: str) -> list[NodeRecord]:
        return self._fresh(self._pulling_layers.get(digest) - self._layers.get(digest))

    def holding_image(self, key: str, layers: Iterable[str] = ()) -> list[NodeRecord]:
        """Nodes that advertise the image, or hold every one of `layers` (its known layer list)."""
        found = set(self._images.get(key))
        wanted = list(layers)
        if wanted:
            complete = set(self._layers.get(wanted[0]))
            for digest in wanted[1:]:
                complete &= self._layers.get(digest)
            found |= complete
        return self._fresh(found)

    def holding_layers(self, digests: Iterable[str]) -> list[NodeRecord]:
        """Nodes that hold every one of `digests` (all of an image's layers: they pulled it)."""
        wanted = list(digests)
        return [n for n in self.live() if all(d in n.layers for d in wanted)]

    def pulling_image(self, key: str) -> list[NodeRecord]:
        return self._fresh(self._pulling_images.get(key) - self._images.get(key))
