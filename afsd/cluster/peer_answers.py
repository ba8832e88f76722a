"""Checks on what peers send, applied where their answers enter this process.

Layerstores answer `StatLayer` (a blob's description) and `PullImage`; discovery replicas answer
`FindProvider`, `ResolveImage` and `GetAccessTraces`, and take `ReportAccessTrace` from nodes. Until checked, every field is hostile: a layer digest becomes a
file name under the node's state directory, a chunk size a buffer size, an implicit directory a path
inside a mount, an endpoint an address this node dials. Each check raises `PeerAnswerError` naming the
peer and what was wrong; the caller treats that peer as failed (and tries the next one), and nothing
the answer carried is used.

What is checked here is form and bounds, and that an answer is about what was asked. Whether a blob
description is the truth about the registry layer is `afsd.trust.descriptors`' job.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Collection, Sequence

from afsd.api import discovery_pb2 as dpb
from afsd.api import layerstore_pb2 as lpb
from afsd.erofs.unpack import decode_dir_path, encode_dir_path
from afsd.errors import AfsdError
from afsd.ondemand.trace import MAX_TRACE_RANGES, normalise_ranges

DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
# Bounds on a blob description: generous for real layers, small enough that nothing derived from them
# (a whole-chunk read, a table in memory) can exhaust the node.
MAX_BLOB_BYTES = 256 << 30
MIN_CHUNK_BYTES = 4 << 10
MAX_CHUNK_BYTES = 16 << 20
MAX_DATA_RANGES = 1 << 20
MAX_IMPLICIT_DIRS = 100_000
MAX_PATH_TEXT = 4096
MAX_LABEL_TEXT = 512          # converter, blob id, media type, node id
MAX_LAYERS = 1024             # layers in one image
MAX_SERVICES = 4096           # nodes in one FindProvider answer
MAX_LISTED_NODES = 100_000    # nodes in all the pages of one listing of the cluster
MAX_HEARTBEAT_LAYERS = 100_000
MAX_ENDPOINT_TEXT = 261       # a 253-byte host name, ':' and a port
_HOST_LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")


class PeerAnswerError(AfsdError):
    """A peer's answer is malformed, out of bounds or about something else than what was asked."""

    def __init__(self, peer: str, problem: str) -> None:
        super().__init__(f"{peer}: {problem}")
        self.peer = peer
        self.problem = problem


def is_digest(text: str) -> bool:
    return bool(DIGEST.match(text))


def check_digest(text: str, *, peer: str, what: str) -> str:
    if not is_digest(text):
        raise PeerAnswerError(peer, f"{what} {_shown(text)} is not sha256:<64 lowercase hex>")
    return text


def check_endpoint(text: str, *, peer: str) -> str:
    """HOST:PORT with a DNS name or an IP literal ([...] for IPv6), nothing else (no `unix:` or scheme):
    it is an address this node will dial."""
    if not endpoint_is_valid(text):
        raise PeerAnswerError(peer, f"endpoint {_shown(text)} is not HOST:PORT")
    return text


def endpoint_is_valid(text: str) -> bool:
    if len(text) > MAX_ENDPOINT_TEXT:
        return False
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536 or port != str(int(port)):
        return False
    if host.startswith("[") and host.endswith("]"):
        try:
            return ipaddress.ip_address(host[1:-1]).version == 6
        except ValueError:
            return False
    try:
        ipaddress.IPv4Address(host)
        return True
    except ValueError:
        pass
    labels = host.rstrip(".").split(".")
    return len(host) <= 253 and all(_HOST_LABEL.match(label) for label in labels)


def implicit_dir_problem(text: str) -> str | None:
    """Why `text` is not a clean implicit directory (`/`, `/a/b`, `%XX` escapes), or None."""
    if not text.startswith("/") or len(text) > MAX_PATH_TEXT:
        return "is not an absolute path of at most 4096 characters"
    parts = decode_dir_path(text)
    if any(part in (b".", b"..") or b"\0" in part for part in parts):
        return "has a '.', '..' or NUL component"
    if encode_dir_path(parts) != text:
        return "is not in canonical form"
    return None


def check_stat(stat: lpb.StatLayerResponse, asked: str, *, peer: str,
               diff_id: str | None = None) -> lpb.StatLayerResponse:
    """`stat` is a well-formed description of layer `asked`'s blob, within bounds; with `diff_id` (from
    the image config), a blob made from exactly that uncompressed tar."""
    if stat.digest != asked:
        raise PeerAnswerError(peer, f"answered StatLayer for layer {_shown(stat.digest)}, not the {asked} asked for")
    check_digest(stat.blob_digest, peer=peer, what="blob digest")
    if stat.diff_id:
        check_digest(stat.diff_id, peer=peer, what="diff_id")
    if stat.metadata_digest:
        check_digest(stat.metadata_digest, peer=peer, what="metadata digest")
    if diff_id is not None and stat.diff_id != diff_id:
        raise PeerAnswerError(peer, f"its blob of layer {asked} was made from diff_id {_shown(stat.diff_id)}, "
                                    f"but the image config says {diff_id}")
    size, chunk = stat.afs_size, stat.chunk_size
    if not 0 < size <= MAX_BLOB_BYTES:
        raise PeerAnswerError(peer, f"blob size {size} is outside 1..{MAX_BLOB_BYTES}")
    if not MIN_CHUNK_BYTES <= chunk <= MAX_CHUNK_BYTES or chunk & (chunk - 1):
        raise PeerAnswerError(peer, f"chunk size {chunk} is not a power of two in "
                                    f"{MIN_CHUNK_BYTES}..{MAX_CHUNK_BYTES}")
    if len(stat.chunk_digests) != -(-size // chunk) or any(len(d) != 32 for d in stat.chunk_digests):
        raise PeerAnswerError(peer, f"chunk table of {len(stat.chunk_digests)} entries does not fit a blob of "
                                    f"{size} bytes in chunks of {chunk} (32-byte sha256 each)")
    if len(stat.data_map) > MAX_DATA_RANGES or any(
            r.offset < 0 or r.length <= 0 or r.offset + r.length > size for r in stat.data_map):
        raise PeerAnswerError(peer, f"data map has ranges outside the blob of {size} bytes")
    if len(stat.implicit_dirs) > MAX_IMPLICIT_DIRS:
        raise PeerAnswerError(peer, f"{len(stat.implicit_dirs)} implicit directories (at most {MAX_IMPLICIT_DIRS})")
    for path in stat.implicit_dirs:
        problem = implicit_dir_problem(path)
        if problem:
            raise PeerAnswerError(peer, f"implicit directory {_shown(path)} {problem}")
    for what, text in (("converter", stat.converter), ("blob id", stat.blob_id), ("media type", stat.media_type)):
        if len(text) > MAX_LABEL_TEXT:
            raise PeerAnswerError(peer, f"{what} is longer than {MAX_LABEL_TEXT} characters")
    if stat.compressed_size < 0:
        raise PeerAnswerError(peer, f"compressed size {stat.compressed_size} is negative")
    return stat


def check_services(services: Sequence[dpb.ServiceInstance], *, peer: str) -> list[dpb.ServiceInstance]:
    """A FindProvider-style answer: bounded, every endpoint dialable, every digest well formed."""
    if len(services) > MAX_SERVICES:
        raise PeerAnswerError(peer, f"listed {len(services)} nodes (at most {MAX_SERVICES})")
    for service in services:
        check_endpoint(service.endpoint, peer=peer)
        if len(service.node_id) > MAX_LABEL_TEXT:
            raise PeerAnswerError(peer, f"node id of {service.endpoint} is longer than {MAX_LABEL_TEXT} characters")
        for digest in [*service.layer_digests, *service.pulling_layers, *(s.digest for s in service.layer_stats)]:
            check_digest(digest, peer=peer, what=f"layer digest of {service.endpoint}")
        for stat in service.layer_stats:
            if stat.blob_digest:
                check_digest(stat.blob_digest, peer=peer, what=f"blob digest of {service.endpoint}")
    return list(services)


def check_heartbeat(request: dpb.HeartbeatRequest, *, peer: str) -> dpb.HeartbeatRequest:
    """A layerstore's heartbeat, as discovery receives it: who it is, where it listens, what it holds."""
    node_id = request.node_id
    if not node_id or len(node_id) > MAX_LABEL_TEXT or not node_id.isprintable() or node_id.strip() != node_id:
        raise PeerAnswerError(peer, f"node id {_shown(node_id)} is empty, too long or not printable")
    check_endpoint(request.endpoint, peer=peer)
    digests = [*request.layer_digests, *request.pulling_layers, *(s.digest for s in request.layer_stats)]
    if len(digests) > MAX_HEARTBEAT_LAYERS:
        raise PeerAnswerError(peer, f"heartbeat lists {len(digests)} layers (at most {MAX_HEARTBEAT_LAYERS})")
    for digest in digests:
        check_digest(digest, peer=peer, what="layer digest")
    for stat in request.layer_stats:
        check_digest(stat.blob_digest, peer=peer, what=f"blob digest of layer {stat.digest}")
        if not 0 < stat.afs_size <= MAX_BLOB_BYTES:
            raise PeerAnswerError(peer, f"blob size {stat.afs_size} of layer {stat.digest} is out of bounds")
    return request


def check_resolved(response: dpb.ResolveImageResponse, *, peer: str) -> dpb.ResolveImageResponse:
    """An image resolution: a manifest digest and at most MAX_LAYERS layers, each with its digest and
    the diff_id from the image config (a blob is checked against it, so it may not be missing)."""
    check_digest(response.manifest_digest, peer=peer, what="manifest digest")
    if not 0 < len(response.layers) <= MAX_LAYERS:
        raise PeerAnswerError(peer, f"resolved an image of {len(response.layers)} layers (1..{MAX_LAYERS})")
    for layer in response.layers:
        check_digest(layer.digest, peer=peer, what="layer digest")
        check_digest(layer.diff_id, peer=peer, what=f"diff_id of layer {layer.digest}")
    return response


def check_pulled(layers: Sequence[lpb.Layer], *, peer: str) -> None:
    """The layers of a PullImage/EnsureLayers answer."""
    if len(layers) > MAX_LAYERS:
        raise PeerAnswerError(peer, f"answered with {len(layers)} layers (at most {MAX_LAYERS})")
    for layer in layers:
        check_digest(layer.digest, peer=peer, what="layer digest")
        check_digest(layer.blob_digest, peer=peer, what=f"blob digest of layer {layer.digest}")


def check_trace_report(request: dpb.ReportAccessTraceRequest, *, peer: str) -> list[tuple[int, int, int]]:
    """A node's report of what a task read first from a blob, as discovery receives it: well formed and
    bounded. Returns its ranges normalised (page-aligned, inside the blob, each byte once)."""
    check_digest(request.layer_digest, peer=peer, what="layer digest")
    check_digest(request.blob_digest, peer=peer, what="blob digest")
    if request.manifest_digest:
        check_digest(request.manifest_digest, peer=peer, what="manifest digest")
    if len(request.node_id) > MAX_LABEL_TEXT:
        raise PeerAnswerError(peer, f"node id is longer than {MAX_LABEL_TEXT} characters")
    if not 0 < request.blob_size <= MAX_BLOB_BYTES:
        raise PeerAnswerError(peer, f"blob size {request.blob_size} is outside 1..{MAX_BLOB_BYTES}")
    return normalise_ranges(_trace_ranges(request.ranges, peer), request.blob_size)  # type: ignore[return-value]


def check_access_traces(response: dpb.GetAccessTracesResponse, asked: Collection[str], *,
                        peer: str) -> list[dpb.AccessTrace]:
    """A GetAccessTraces answer: at most one trace per blob asked about, none about another, each bounded."""
    seen: set[str] = set()
    for trace in response.traces:
        if trace.blob_digest not in asked or trace.blob_digest in seen:
            raise PeerAnswerError(peer, f"answered with a trace for blob {_shown(trace.blob_digest)}, which was "
                                        "not asked for (or twice)")
        seen.add(trace.blob_digest)
        _trace_ranges(trace.ranges, peer)
    return list(response.traces)


def learned_ranges(trace: dpb.AccessTrace, size: int, *, peer: str) -> list[tuple[int, int]]:
    """The (offset, length) ranges of a checked trace (`check_access_traces`) of a blob of `size` bytes, in
    first-read order: a trace of another size is refused; ranges past the blob's end are cut off."""
    if trace.blob_size != size:
        raise PeerAnswerError(peer, f"its trace of blob {trace.blob_digest} is of a blob of {trace.blob_size} "
                                    f"bytes, not {size}")
    return [(offset, length) for offset, length, _ in normalise_ranges(_trace_ranges(trace.ranges, peer), size)]


def _trace_ranges(ranges: Sequence[dpb.TraceRange], peer: str) -> list[tuple[int, int, int]]:
    if len(ranges) > MAX_TRACE_RANGES:
        raise PeerAnswerError(peer, f"a trace of {len(ranges)} ranges (at most {MAX_TRACE_RANGES})")
    triples = [(r.offset, r.length, r.first_read_ms) for r in ranges]
    if any(offset < 0 or length <= 0 or ms < 0 for offset, length, ms in triples):
        raise PeerAnswerError(peer, "a trace with a negative offset or time, or an empty range")
    return triples


def _shown(text: str, limit: int = 80) -> str:
    """A peer's text quoted for a log line: repr'd (no control characters) and cut short."""
    return repr(text if len(text) <= limit else text[:limit] + "...")
