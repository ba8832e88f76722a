"""Which layerstores get which layers so that every layer of an image is on at least N of them.

Per layer short of N copies (fewest copies first, then the biggest), the missing copies go to distinct
layerstores that lack it, preferring, in order: one whose cache has room for it (or whose limit is
unknown); one holding fewer of this image's layers, counting what this plan already gave it (so copies
spread over nodes instead of making one node a full replica again); fewer layers assigned by this plan;
more free cache; then the endpoint, so that the plan is deterministic.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from afsd.api import discovery_pb2 as dpb
from afsd.proxy.discovery_view import layers_held


@dataclass
class _Store:
    endpoint: str
    held: set[str]
    free_bytes: int | None        # None: the layerstore does not say how big its cache is
    coverage: int                 # layers of this image it holds
    assigned: list[dpb.ImageLayer] = field(default_factory=list)

    def has_room_for(self, layer: dpb.ImageLayer) -> bool:
        return self.free_bytes is None or self.free_bytes >= layer.compressed_size

    def order(self, layer: dpb.ImageLayer) -> tuple:
        free = self.free_bytes if self.free_bytes is not None else 1 << 62
        return (not self.has_room_for(layer), self.coverage + len(self.assigned), len(self.assigned), -free,
                self.endpoint)


def holders(layers: Sequence[dpb.ImageLayer], instances: Sequence[dpb.ServiceInstance]) -> dict[str, list[dpb.ServiceInstance]]:
    """For each layer digest, the layerstores holding it (in the order given)."""
    held = [(instance, layers_held(instance)) for instance in instances]
    return {layer.digest: [i for i, digests in held if layer.digest in digests] for layer in layers}


def current_replica(layers: Sequence[dpb.ImageLayer], instances: Sequence[dpb.ServiceInstance]) -> int:
    """The number of copies of the image's least copied layer (0 for an image without layers)."""
    counts = [len(found) for found in holders(layers, instances).values()]
    return min(counts) if counts else 0


def plan(layers: Sequence[dpb.ImageLayer], instances: Sequence[dpb.ServiceInstance],
         replica: int) -> dict[str, list[dpb.ImageLayer]]:
    """Endpoint → the layers to copy there. Layers that cannot reach `replica` copies (too few
    layerstores lack them) get as many as there are layerstores."""
    image = {layer.digest for layer in layers}
    stores = []
    for instance in instances:
        held = layers_held(instance)
        used = sum(stat.afs_size for stat in instance.layer_stats)
        free = instance.cache_max_bytes - used if instance.cache_max_bytes > 0 else None
        stores.append(_Store(instance.endpoint, held, free, len(held & image)))
    counts = {digest: len(found) for digest, found in holders(layers, instances).items()}
    needs = sorted((layer for layer in layers if counts[layer.digest] < replica),
                   key=lambda layer: (counts[layer.digest], -layer.compressed_size, layer.digest))
    for layer in needs:
        lacking = sorted((s for s in stores if layer.digest not in s.held), key=lambda s: s.order(layer))
        for store in lacking[:replica - counts[layer.digest]]:
            store.assigned.append(layer)
            store.held.add(layer.digest)
            if store.free_bytes is not None:
                store.free_bytes -= layer.compressed_size
    return {store.endpoint: store.assigned for store in stores if store.assigned}
