"""Prometheus metrics of the fanotify backend, made from the supervisor's status reply.

The supervisor keeps plain counters and answers `status` with them; this module turns such a status
into metric families. Either the supervisor serves them itself (`--metrics-listen HOST:PORT`, a
background thread reading a snapshot the loop refreshes every second), or the node daemon registers a
`StatusCollector` fed by `SupervisorClient.status()` into its own registry.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from afsd.metrics import parse_listen

_COUNTER_HELP = {
    "events_total": "pre-content events received",
    "events_allowed_present": "events allowed at once: the range was already filled",
    "events_allowed_filled": "events allowed after their range was filled",
    "events_denied_failed": "events failed with EIO: the fill failed",
    "events_denied_timeout": "events failed with EIO: the fetch deadline passed",
    "events_denied_unknown": "events failed with EIO: the file is not (or no longer) served",
    "events_recovered": "events a previous supervisor left unanswered, answered by this one",
    "events_swept": "events a previous supervisor read but had not journaled, failed with EIO",
    "events_redispatched": "waiting events whose fill moved to another worker after a worker was lost",
    "tasks_dispatched": "fill tasks sent to workers (re-sends included)",
    "tasks_done": "fill tasks completed",
    "tasks_failed": "fill tasks that failed",
    "tasks_redispatched": "fill tasks given to another worker after theirs was lost",
    "tasks_cancelled": "fill tasks cancelled because nobody waited for them any more",
    "bytes_filled": "bytes written into blobs",
    "bytes_prefetched": "bytes written into blobs by background prefetch",
    "worker_restarts": "fetch workers replaced",
    "worker_deaths": "fetch workers that died on their own",
    "worker_hangs": "fetch workers killed for missing heartbeats",
    "keeper_restarts": "keepers replaced after dying",
    "blobs_completed": "blobs that became complete (mark removed)",
}


class StatusCollector(Collector):
    def __init__(self, status: Callable[[], dict[str, Any]]) -> None:
        self._status = status

    def collect(self) -> Iterator[Any]:
        status = self._status()
        if not status:
            return
        for name, value in status.get("counters", {}).items():
            family = CounterMetricFamily(f"afsd_fanotify_{name}", _COUNTER_HELP.get(name, name))
            family.add_metric([], value)
            yield family
        restarts = CounterMetricFamily("afsd_fanotify_supervisor_restarts", "supervisors the keeper restarted")
        restarts.add_metric([], status.get("supervisor_restarts", 0))
        yield restarts
        pending = GaugeMetricFamily("afsd_fanotify_pending_events", "events waiting for a fill")
        pending.add_metric([], status.get("pending_events", 0))
        yield pending
        latency = status.get("latency")
        if latency:
            family = HistogramMetricFamily("afsd_fanotify_event_seconds",
                                           "time from receiving an event to answering it", labels=["outcome"])
            for outcome in ("present", "filled"):
                counts = latency[outcome]["counts"]
                cumulative, buckets = 0, []
                for bound, count in zip([*map(str, latency["buckets"]), "+Inf"], counts):
                    cumulative += count
                    buckets.append((bound, cumulative))
                family.add_metric([outcome], buckets, latency[outcome]["sum"])
            yield family
        present = GaugeMetricFamily("afsd_fanotify_blob_present_bytes", "bytes of a blob on this node",
                                    labels=["blob"])
        size = GaugeMetricFamily("afsd_fanotify_blob_size_bytes", "size of a served blob", labels=["blob"])
        for blob in status.get("blobs", []):
            present.add_metric([blob["name"]], blob["present_bytes"])
            size.add_metric([blob["name"]], blob["size"])
        yield present
        yield size


def serve_status_metrics(address: str, status: Callable[[], dict[str, Any]]) -> None:
    """Serve /metrics at `address` (HOST:PORT) from a background thread."""
    from prometheus_client import CollectorRegistry, start_http_server

    registry = CollectorRegistry()
    registry.register(StatusCollector(status))
    host, port = parse_listen(address)
    start_http_server(port, addr=host, registry=registry)
