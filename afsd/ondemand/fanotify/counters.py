"""The fanotify supervisor's counters, by name, and which per-source counter a fill's bytes go to.

Kept apart from metrics.py, which says what each means for Prometheus: the supervisor counts without
importing prometheus_client unless it serves metrics.
"""

from __future__ import annotations

COUNTERS = (  # the supervisor's own (metrics.py says what each means)
    "events_total", "events_allowed_present", "events_allowed_present_intake", "events_allowed_filled", "events_denied_failed",
    "events_denied_timeout", "events_denied_unknown", "events_recovered", "events_swept",
    "events_redispatched", "tasks_dispatched", "tasks_done", "tasks_failed", "tasks_redispatched",
    "tasks_cancelled", "fills_inline", "fills_inline_failed", "bytes_filled", "bytes_prefetched",
    "worker_restarts", "worker_deaths", "worker_hangs", "keeper_restarts", "blobs_completed", "bytes_filled_local",
    "bytes_filled_peer", "bytes_filled_other", "events_filled_demand", "learned_blobs", "learned_bytes_prefetched",
    "learned_bytes_used", "learned_bytes_read", "learned_waits", "learned_wait_ms")
WORKER_COUNTERS = ("fetch_failovers", "fetch_verification_failures")   # counted by the fetch workers
# Counted where the bytes are written: by the fetch workers (sent with their heartbeats: a fill cancelled as
# its blob became whole sends no FillDone, but what it wrote counts) and by the supervisor's inline fills.
FILLED_COUNTERS = ("bytes_filled", "bytes_filled_local", "bytes_filled_peer", "bytes_filled_other")


def source_kind(source: str) -> str:
    """"local", "peer" or "other" for a fill's source label ("local", "peer:HOST:PORT", "local+peer:...",
    a lab source's own name): where the bytes came from, for the per-source byte counters."""
    kinds = {part.split(":", 1)[0] for part in source.split("+") if part}
    if "peer" in kinds:
        return "peer"
    return "local" if kinds == {"local"} else "other"
