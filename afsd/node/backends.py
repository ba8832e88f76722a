"""Which on-demand backends the node daemon runs, and how they get their bytes: the cluster's sources,
injected (afsd/cluster/sources.py): in-process for prefill and eager fetches, by name for the fetch
workers of the supervised backends."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from afsd.cluster.discovery_client import DiscoveryClient
from afsd.cluster.sources import CLUSTER_SOURCES, blob_source
from afsd.errors import UsageError
from afsd.ondemand.base import Backend, BackendOptions, BlobSource
from afsd.ondemand.registry import BACKEND_NAMES, backend_class
from afsd.ondemand.spec import BlobSpec
from afsd.rpc import ChannelPool

if TYPE_CHECKING:
    from afsd.trust.tls import TlsConfig


def build_backends(state_dir: Path, enabled: Sequence[str] | None, *, prefetch: bool = True,
                   spreads: bool = False, fetch_workers: int | None = None) -> dict[str, Backend]:
    """The backends `enabled` (default: all of afsd.ondemand.registry's), each with its state directory
    under `state_dir`. `spreads`: the node hands complete blobs to a local layerstore (then fscache keeps a
    plain copy of each blob beside its cache file, which costs the blob's size on disk a second time).
    `fetch_workers`: worker processes of the backends that have them (None: each one's default)."""
    names = list(enabled) if enabled else list(BACKEND_NAMES)
    unknown = [n for n in names if n not in BACKEND_NAMES]
    if unknown:
        raise UsageError(f"unknown backend(s) {', '.join(unknown)}: this build has {', '.join(BACKEND_NAMES)}")
    options = {name: BackendOptions(state_dir / name, prefetch=prefetch, keep_blob_copies=spreads,
                                    sources=CLUSTER_SOURCES, fetch_workers=fetch_workers) for name in names}
    return {name: backend_class(name).create(options[name]) for name in names}


def source_factory(discovery: DiscoveryClient, channels: ChannelPool, *, discovery_endpoints: list[str],
                   local_endpoint: str | None, node_id: str, tls: TlsConfig | None = None,
                   byte_stream: bool = True) -> Callable[[BlobSpec], BlobSource]:
    """Per layer: a RangeFetcher reading from peer layerstores, and the settings a fetch worker in
    another process needs to build its own (the paths of this node's TLS files and its fetch options
    among them: both read the same way)."""
    options = {} if byte_stream else {"byte_stream": False}

    def make(spec: BlobSpec) -> BlobSource:
        return blob_source(spec, discovery, channels, discovery_endpoints=discovery_endpoints,
                           local_endpoint=local_endpoint, node_id=node_id, tls=tls, fetch_options=options)
    return make
