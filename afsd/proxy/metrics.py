"""Prometheus metrics of the proxy, served on `/metrics` of `--http-listen` with the per-RPC `afsd_rpc_*`."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

DISPATCHES = Counter(
    "afsd_proxy_dispatches_total",
    "Execute calls by outcome: ok (relayed to the end), backend_failed (the afslet died or failed after "
    "accepting), backend_error (the afslet ended the call with an error status), cancelled (the client went "
    "away), invalid (bad start frame), too_big (bigger than every afslet's limits), refused (an afslet "
    "rejected the request as invalid), exhausted (retries used up)",
    ["outcome"])
RETRIES = Counter(
    "afsd_proxy_dispatch_retries_total",
    "Dispatch attempts that failed and were retried, by reason: no_backends (DNS gave nothing), unreachable "
    "(no afslet answered, or the chosen one could not be reached), no_room (none had room), refused (the "
    "chosen afslet answered RESOURCE_EXHAUSTED), handshake (it did not accept in time or broke the protocol)",
    ["reason"])
QUEUE_LENGTH = Gauge("afsd_proxy_dispatch_queue_length", "Execute calls waiting for an afslet (not yet accepted)")
RELAYING = Gauge("afsd_proxy_relaying_calls", "Execute calls accepted by an afslet and being relayed")
CHOSEN = Counter("afsd_proxy_backend_chosen_total", "Execute calls accepted, by the afslet that accepted them",
                 ["backend"])
DISPATCH_SECONDS = Histogram(
    "afsd_proxy_dispatch_seconds", "From the start frame to an afslet's `accepted` (retries and backoff included)",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
