"""Prometheus metrics of the fscache backend, made from the supervisor's status (how they are collected
and served: afsd/ondemand/supervised/metrics.py)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily

from afsd.ondemand.cachefiles.counters import SUPERVISOR_COUNTERS, WORKER_COUNTERS
from afsd.ondemand.supervised.metrics import SupervisorStatusCollector, blob_gauge, counter, gauge
from afsd.ondemand.supervised.protocol import SupervisorStatus


class StatusCollector(SupervisorStatusCollector):
    def families(self, status: SupervisorStatus) -> Iterator[Any]:
        counters = status.counters
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
            if not name.startswith(("requests_", "bytes_")):
                yield counter(f"afsd_fscache_{name}", help_text, counters.get(name, 0))
        yield gauge("afsd_fscache_open_objects", "cache objects (blobs) the worker holds open",
                    status.details.get("open_objects", 0))
        yield blob_gauge("afsd_fscache_blob_present_bytes", "bytes of a blob in its cache file",
                         status.blobs, "present_bytes")
