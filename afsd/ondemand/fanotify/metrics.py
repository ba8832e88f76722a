"""Prometheus metrics of the fanotify backend, made from the supervisor's status reply (how they are
collected and served: afsd/ondemand/supervised/metrics.py)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client.core import HistogramMetricFamily

from afsd.ondemand.supervised.metrics import SupervisorStatusCollector, blob_gauge, counter, gauge
from afsd.ondemand.supervised.protocol import SupervisorStatus

_COUNTER_HELP = {
    "events_total": "pre-content events received",
    "events_allowed_present": "events allowed at once: the range was already filled",
    "events_allowed_present_intake": "of those, events the C intake answered without a Python round (intake.py)",
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
    "fills_inline": "misses the supervisor filled itself from a file on this machine (no fetch worker)",
    "fills_inline_failed": "of those, fills that failed",
    "bytes_filled": "bytes written into blobs",
    "bytes_prefetched": "bytes written into blobs by background prefetch",
    "worker_restarts": "fetch workers replaced",
    "worker_deaths": "fetch workers that died on their own",
    "worker_hangs": "fetch workers killed for missing heartbeats",
    "keeper_restarts": "keepers replaced after dying",
    "blobs_completed": "blobs that became complete (mark removed)",
    "bytes_filled_local": "bytes filled from this node's own layerstore",
    "bytes_filled_peer": "bytes filled from peer layerstores",
    "bytes_filled_other": "bytes filled from other sources (tests, benchmarks)",
    "events_filled_demand": "events allowed after waiting for a demand fill (a fetch the miss caused)",
    "learned_blobs": "blobs registered with a learned trace (what the cluster learned readers read first)",
    "learned_bytes_prefetched": "bytes of learned ranges fetched before readers asked (whole chunks)",
    "learned_bytes_used": "of those, bytes readers then read (whole chunks; prefetched but unread = wasted)",
    "learned_bytes_read": "bytes readers read of blobs with a learned trace, learned or not (whole chunks)",
    "learned_waits": "reads that waited for a fill of their blob's learned prefetch (it had not reached them yet)",
    "learned_wait_ms": "milliseconds those reads waited, summed",
    "fetch_failovers": "reads that abandoned a provider after it failed (in the fetch workers)",
    "fetch_verification_failures": "fetched ranges that did not match the blob's chunk digests",
}


class StatusCollector(SupervisorStatusCollector):
    def families(self, status: SupervisorStatus) -> Iterator[Any]:
        for name, value in status.counters.items():
            yield counter(f"afsd_fanotify_{name}", _COUNTER_HELP.get(name, name), value)
        yield counter("afsd_fanotify_supervisor_restarts", "supervisors the keeper restarted",
                      status.details.get("supervisor_restarts", 0))
        yield gauge("afsd_fanotify_pending_events", "events waiting for a fill",
                    status.details.get("pending_events", 0))
        latency = status.details.get("latency")
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
        blobs = status.blobs
        yield blob_gauge("afsd_fanotify_blob_present_bytes", "bytes of a blob on this node", blobs, "present_bytes")
        yield blob_gauge("afsd_fanotify_blob_size_bytes", "size of a served blob", blobs, "size")
