"""Prometheus metrics of the Execute service (served on `--metrics-listen` with the process's others).

Labels are kept low-cardinality: outcomes, phases, stop reasons and stages; never ids or images.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

EXECUTIONS = Counter(
    "afsd_let_executions_total",
    "Execute calls by outcome: ok, failed (non-zero exit), timeout, oom, setup_error, stopped (afsd stop), "
    "shutdown (stopped by afslet's drain), cancelled (client went away), invalid (malformed stream), rejected "
    "(admission), draining (refused: afslet is shutting down)",
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
STOPS = Counter(
    "afsd_let_stops_total",
    "Commands afslet stopped with the staged abort, by why (timeout, stop, shutdown, cancelled) and the stage "
    "that ended them (term, interrupt, kill; none: it ended on its own before the first signal)",
    ["reason", "stage"])
EXECUTION_CPU_SECONDS = Histogram(
    "afsd_execution_cpu_seconds",
    "CPU time (user + system) a command used, from its container's cgroup, by outcome",
    ["outcome"],
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600))
EXECUTION_MEMORY_PEAK_BYTES = Histogram(
    "afsd_execution_memory_peak_bytes",
    "Peak memory of a command's container (its cgroup's high-water mark), by outcome",
    ["outcome"],
    buckets=tuple(float(2**n) for n in range(20, 37, 2)))  # 1 MiB .. 64 GiB
