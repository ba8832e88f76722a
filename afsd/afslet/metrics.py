"""Prometheus metrics of the Execute service (served on `--metrics-listen` with the process's others)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

EXECUTIONS = Counter(
    "afsd_let_executions_total",
    "Execute calls by outcome: ok, failed (non-zero exit), timeout, oom, setup_error, cancelled (client went "
    "away), invalid (malformed stream), rejected (admission)",
    ["outcome"])
RUNNING = Gauge("afsd_let_running_containers", "Containers running right now")
PHASE_SECONDS = Histogram(
    "afsd_let_phase_seconds",
    "Time spent per Execute phase: receive (extra files), resolve (image config), mount, start (runc run), "
    "run (the command), upload (tar of the writable layer to the client), teardown, total",
    ["phase"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 120, 600))
TEARDOWN_FAILURES = Counter("afsd_let_teardown_failures_total",
                            "Sessions whose container, cgroup or mount could not be fully removed", ["what"])
