"""Prometheus metrics made from a supervisor's `status` reply, for both supervised backends.

A supervisor keeps plain counters and answers `status` with them; a backend's `StatusCollector` (a
subclass of `SupervisorStatusCollector`, in fanotify/metrics.py and cachefiles/metrics.py) turns such a
status into metric families. Either the supervisor serves them itself (`--metrics-listen HOST:PORT`, a
background thread reading a snapshot its loop refreshes every second: `serve_status_metrics`), or the node
daemon registers a collector fed by its client's `status()` in its own registry.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from afsd.metrics import parse_listen
from afsd.ondemand.supervised.status import BlobStatus, SupervisorStatus


class SupervisorStatusCollector(Collector):
    def __init__(self, status: Callable[[], SupervisorStatus | None]) -> None:
        self._status = status

    def collect(self) -> Iterator[Any]:
        status = self._status()
        if status is not None:
            yield from self.families(status)

    @abstractmethod
    def families(self, status: SupervisorStatus) -> Iterator[Any]:
        """The metric families of one status."""


def counter(name: str, help_text: str, value: float) -> CounterMetricFamily:
    family = CounterMetricFamily(name, help_text)
    family.add_metric([], value)
    return family


def gauge(name: str, help_text: str, value: float) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, help_text)
    family.add_metric([], value)
    return family


def blob_gauge(name: str, help_text: str, blobs: Iterable[BlobStatus], key: str) -> GaugeMetricFamily:
    """One sample per blob (label `blob`) of its status field `key`; blobs without a value are left out."""
    family = GaugeMetricFamily(name, help_text, labels=["blob"])
    for blob in blobs:
        value = getattr(blob, key)
        if value is not None:
            family.add_metric([blob.name], value)
    return family


def serve_status_metrics(address: str, collector: Collector) -> None:
    """Serve /metrics at `address` (HOST:PORT) from a background thread."""
    from prometheus_client import CollectorRegistry, start_http_server

    registry = CollectorRegistry()
    registry.register(collector)
    host, port = parse_listen(address)
    start_http_server(port, addr=host, registry=registry)
