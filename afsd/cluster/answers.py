"""Discovery's answers, kept small: which part of each node's record goes out (the view), in which
order, and how many per answer (pages under a size cap). Pure functions over `NodeRecord`s.

Why: a node's whole record lists every layer it holds with its stats (~200 bytes a layer), so an answer
listing whole records of 1,000 nodes × 100 layers is ~20 MB, past gRPC's 4 MiB default receive limit
(at ~184 such nodes). Now:
- a query about a layer or an image gets each node's record cut down to what was asked (the view
  SERVICE_VIEW_ASKED, the default): ~150 bytes a node;
- every answer stops before `ANSWER_BYTES` or `max_services` (for a query about a layer or an image,
  `READER_PROVIDERS` when not given), with a `next_page_token` to ask for the rest; a client that
  ignores the token (the reference's) gets the first page instead of an error;
- the order is by node id, as before; a requester that names its endpoint is listed first when it
  qualifies, and the others come in an order hashed from that endpoint, so that capped answers to
  different readers spread them over the holders instead of sending everyone to the same few. Pages go
  by the order's key (the token holds the seed and the last key sent), so a node joining or leaving
  between pages never shifts the others.
"""

from __future__ import annotations

import hashlib
import heapq
from collections.abc import Iterable
from dataclasses import dataclass

from afsd.api import discovery_pb2 as pb
from afsd.cluster.nodetable import NodeRecord

ANSWER_BYTES = 1 << 20      # well under gRPC's 4 MiB default receive limit
READER_PROVIDERS = 64       # a query about a layer or image without max_services: more than a reader
                            # ever tries, and the rest is a page token away
TOKEN_VERSION = "1"


class PageTokenError(ValueError):
    """A page token this discovery did not write."""


@dataclass(frozen=True)
class Query:
    layer_digest: str = ""                 # a query about one layer
    image_key: str = ""                    # a query about one image ...
    image_layers: tuple[str, ...] = ()     # ... whose layers these are (when discovery knows them)
    view: int = pb.SERVICE_VIEW_ASKED
    max_services: int = 0
    page_token: str = ""
    requester: str = ""

    @property
    def about_something(self) -> bool:
        return bool(self.layer_digest or self.image_key)


def instance(node: NodeRecord, query: Query) -> pb.ServiceInstance:
    """`node`'s record as the query's view shows it."""
    brief = pb.ServiceInstance(node_id=node.node_id, endpoint=node.endpoint, last_seen_unix=node.last_seen_unix,
                               cache_max_bytes=node.cache_max_bytes)
    if query.view == pb.SERVICE_VIEW_ENDPOINTS:
        return brief
    if query.view == pb.SERVICE_VIEW_FULL or not query.about_something:
        digests = sorted(node.layers)
        brief.layer_digests.extend(digests)
        brief.cached_images.extend(sorted(node.cached_images))
        brief.pulling_images.extend(sorted(node.pulling_images))
        brief.pulling_layers.extend(sorted(node.pulling_layers))
        brief.layer_stats.extend(_stat(node, d) for d in digests)
        return brief
    layers = [query.layer_digest] if query.layer_digest else list(query.image_layers)
    held = [d for d in dict.fromkeys(layers) if d in node.layers]
    brief.layer_digests.extend(held)
    brief.layer_stats.extend(_stat(node, d) for d in held)
    brief.pulling_layers.extend(d for d in dict.fromkeys(layers) if d in node.pulling_layers)
    if query.image_key:
        if query.image_key in node.cached_images:
            brief.cached_images.append(query.image_key)
        if query.image_key in node.pulling_images:
            brief.pulling_images.append(query.image_key)
    return brief


def _stat(node: NodeRecord, digest: str) -> pb.LayerStat:
    size, blob = node.layers[digest]
    return pb.LayerStat(digest=digest, afs_size=size, blob_digest=blob)


BY_NODE_ID = "-"   # the seed that stands for the plain order: node id, then endpoint


def order_key(seed: str, node: NodeRecord) -> bytes:
    if seed == BY_NODE_ID:
        return node.node_id.encode() + b"\0" + node.endpoint.encode()
    return hashlib.blake2b(node.endpoint.encode(), digest_size=8, key=seed.encode()[:64]).digest()


def _seed_and_after(query: Query) -> tuple[str, str | None]:
    """The order's seed and the last key already sent (None: first page)."""
    if query.page_token:
        version, _, rest = query.page_token.partition(".")
        seed, dot, after = rest.partition(".")
        if version != TOKEN_VERSION or not dot or not seed or not _is_hex(after):
            raise PageTokenError(f"page_token {query.page_token[:40]!r} was not written by this discovery")
        return seed, after
    if query.requester:
        return hashlib.blake2b(query.requester.encode(), digest_size=8).hexdigest(), None
    return BY_NODE_ID, None


def _is_hex(text: str) -> bool:
    try:
        bytes.fromhex(text)
    except ValueError:
        return False
    return True


def page(nodes: Iterable[NodeRecord], query: Query,
         budget: int = ANSWER_BYTES) -> tuple[list[pb.ServiceInstance], str, int]:
    """(services of this page, next_page_token or "", how many services matched in all). One node per
    endpoint; at least one service per page, however large its record."""
    if query.max_services < 0:
        raise ValueError(f"max_services must be >= 0 (got {query.max_services})")
    seed, after_hex = _seed_and_after(query)
    after = bytes.fromhex(after_hex) if after_hex else (b"" if after_hex == "" else None)
    unique: dict[str, NodeRecord] = {}
    for node in nodes:
        unique.setdefault(node.endpoint, node)
    keyed = [(b"" if endpoint == query.requester else order_key(seed, node), node)
             for endpoint, node in unique.items()]
    remaining = [item for item in keyed if after is None or item[0] > after]
    cap = query.max_services or (READER_PROVIDERS if query.about_something else 0)
    # Only the first `cap` in order are needed: a partial sort (heapq) when the cap is small.
    ordered = heapq.nsmallest(cap, remaining, key=_first) if cap else sorted(remaining, key=_first)
    services: list[pb.ServiceInstance] = []
    used, last = 0, b""
    for key, node in ordered:
        item = instance(node, query)
        size = item.ByteSize() + 6  # field tag and length prefix
        if services and used + size > budget:
            break
        services.append(item)
        used, last = used + size, key
    more = len(services) < len(remaining)
    return services, (f"{TOKEN_VERSION}.{seed}.{last.hex()}" if more else ""), len(keyed)


def _first(item: tuple[bytes, NodeRecord]) -> bytes:
    return item[0]
