"""The cluster's sources for the on-demand backends: verified blob bytes from peer layerstores.

Where it sits: the node daemon gives every backend a `BlobSource` per layer (`blob_source`): an in-process
RangeFetcher (prefill, eager fetches) and the source configuration a fetch worker in another process
builds its own from. The supervised backends' workers load `ClusterSources` (named by `CLUSTER_SOURCES`
in their supervisor's settings: afsd/ondemand/sources.py says how sources are injected), which turns

    {"kind": "cluster", "discovery": ["host:port", ...], "local_endpoint": "host:port" | "",
     "node_id": "...", "tls": {"ca", "cert", "key": paths} | null,
     "options": {<RangeFetcher keyword arguments: call_timeout, min_request, ...>}}

into a RangeFetcher (failover, leases), and still serves the "file" kind.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from afsd.ondemand.sources import FileSources
from afsd.ondemand.spec import BlobSpec, RangeSource

if TYPE_CHECKING:   # the gRPC stack is imported only where a cluster source is made (workers load this module)
    from afsd.cluster.discovery_client import DiscoveryClient
    from afsd.ondemand.base import BlobSource
    from afsd.rpc import ChannelPool
    from afsd.trust.tls import TlsConfig

CLUSTER_SOURCES = "afsd.cluster.sources:ClusterSources"


def cluster_source_config(discovery_endpoints: list[str], *, local_endpoint: str | None, node_id: str,
                          tls: TlsConfig | None = None, **options: Any) -> dict[str, Any]:
    """The source configuration of a layer read from the cluster (what `ClusterSources.make` reads); `tls`:
    the paths of this node's TLS files (a worker reads them itself)."""
    config: dict[str, Any] = {"kind": "cluster", "discovery": list(discovery_endpoints),
                              "local_endpoint": local_endpoint or "", "node_id": node_id,
                              "tls": tls.to_json() if tls else None}
    if options:
        config["options"] = options
    return config


def blob_source(spec: BlobSpec, discovery: DiscoveryClient, channels: ChannelPool, *, discovery_endpoints: list[str],
                local_endpoint: str | None, node_id: str, tls: TlsConfig | None = None,
                fetch_options: dict[str, Any] | None = None) -> BlobSource:
    """A layer's bytes for the node daemon: its own RangeFetcher, and the configuration for fetch workers;
    both read with the same `fetch_options` (RangeFetcher keyword arguments, e.g. byte_stream=False)."""
    from afsd.cluster.fetcher import RangeFetcher
    from afsd.ondemand.base import BlobSource

    options = fetch_options or {}
    fetcher = RangeFetcher(spec, discovery=discovery, channels=channels, local_endpoint=local_endpoint, node_id=node_id,
                           **options)
    return BlobSource(fetcher, cluster_source_config(discovery_endpoints, local_endpoint=local_endpoint,
                                                     node_id=node_id, tls=tls, **options))


class ClusterSources(FileSources):
    """Sources of one fetch worker: cluster sources share its gRPC channels and discovery clients."""

    def __init__(self) -> None:
        self._channels: ChannelPool | None = None
        self._discovery: dict[tuple[str, ...], DiscoveryClient] = {}

    def preload(self) -> None:
        # The gRPC stack costs a worker 0.2 s of CPU (seconds on a loaded node): paid as the worker starts,
        # not by the reader waiting on the first fill.
        import afsd.cluster.discovery_client
        import afsd.cluster.fetcher
        import afsd.rpc
        import afsd.trust.tls  # noqa: F401

    def make(self, spec: BlobSpec, config: dict[str, Any]) -> RangeSource:
        if config.get("kind") != "cluster":
            return super().make(spec, config)
        # Imported here (and by `preload`): a worker that reads only files never loads the gRPC stack.
        from afsd.cluster.discovery_client import DiscoveryClient
        from afsd.cluster.fetcher import RangeFetcher
        from afsd.rpc import ChannelPool
        from afsd.trust.tls import TlsConfig

        if self._channels is None:   # one worker serves one node: its TLS files are the same for every blob
            self._channels = ChannelPool(TlsConfig.from_json(config.get("tls")))
        endpoints = tuple(config.get("discovery") or ())
        discovery = None
        if endpoints:
            discovery = self._discovery.get(endpoints)
            if discovery is None:
                discovery = self._discovery[endpoints] = DiscoveryClient(list(endpoints), self._channels)
        return RangeFetcher(spec, discovery=discovery, channels=self._channels,
                            local_endpoint=config.get("local_endpoint") or None, node_id=config.get("node_id", ""),
                            **config.get("options", {}))

    async def close(self) -> None:
        if self._channels is not None:
            await self._channels.close()

    def metrics(self) -> dict[str, float]:
        from afsd.cluster.fetch_metrics import FETCH_METRICS

        return FETCH_METRICS.totals()
