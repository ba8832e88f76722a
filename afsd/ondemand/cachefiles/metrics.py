"""Prometheus metrics of the fscache backend, made from the supervisor's status.

The supervisor serves them itself with `--metrics-listen HOST:PORT` (a background thread reading the
snapshot its loop refreshes every second); a node daemon can register a `StatusCollector` fed by
`FscacheClient.status()` in its own registry instead.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from afsd.metrics import parse_listen
from afsd.ondemand.cachefiles.counters import SUPERVISOR_COUNTERS, WORKER_COUNTERS


class StatusCollector(Collector):
    def __init__(self, status: Callable[[], dict[str, Any]]) -> None:
        self._status = status

    def collect(self) -> Iterator[Any]:
        status = self._status()
        if not status:
            return
        counters = status.get("counters", {})
        requests = CounterMetricFamily("afsd_fscache_requests", "requests read from /dev/cachefiles",
                                       labels=["opcode"])
        for opcode in ("open", "read", "close"):
            requests.add_metric([opcode], counters.get(f"requests_{opcode}", 0))
        yield requests
        written = CounterMetricFamily("afsd_fscache_bytes", "bytes written into cache files", labels=["kind"])
        for kind in ("demand", "prefetch"):
            written.add_metric([kind], counters.get(f"bytes_{kind}", 0))
        yield written
        for name, help_text in {**WORKER_COUNTERS, **SUPERVISOR_COUNTERS}.items():
            if name.startswith(("requests_", "bytes_")):
                continue
            family = CounterMetricFamily(f"afsd_fscache_{name}", help_text)
            family.add_metric([], counters.get(name, 0))
            yield family
        objects = GaugeMetricFamily("afsd_fscache_open_objects", "cache objects (blobs) the worker holds open")
        objects.add_metric([], status.get("worker", {}).get("open_objects", 0))
        yield objects
        present = GaugeMetricFamily("afsd_fscache_blob_present_bytes", "bytes of a blob in its cache file",
                                    labels=["blob"])
        for blob in status.get("blobs", []):
            if blob.get("present_bytes") is not None:
                present.add_metric([blob["name"]], blob["present_bytes"])
        yield present


def serve_status_metrics(address: str, status: Callable[[], dict[str, Any]]) -> None:
    """Serve /metrics at `address` (HOST:PORT) from a background thread."""
    from prometheus_client import CollectorRegistry, start_http_server

    registry = CollectorRegistry()
    registry.register(StatusCollector(status))
    host, port = parse_listen(address)
    start_http_server(port, addr=host, registry=registry)
