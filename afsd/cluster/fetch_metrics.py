"""The afsd_fetch_* metrics: every verified range a node's RangeFetchers read, in whichever process.

RangeFetchers run in the node daemon (metadata prefill, eager fetches) and in the fetch workers of the
supervised backends, whose metrics registry nothing serves. So every process counts into its
`FETCH_METRICS` as plain totals; a worker's totals travel with its heartbeats (its source factory's
`metrics()`, afsd/cluster/sources.py), its supervisor adds up its workers' (`SupervisorStatus.fetch`),
and the node daemon adds every backend's to its own (`add_process`): the node's /metrics shows every fetch
the node made. Totals are a flat map of names to numbers, so they sum the same way at every step.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

from prometheus_client import REGISTRY
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

SECONDS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_COUNTERS = {
    "failovers": ("afsd_fetch_failovers", "Reads that abandoned a provider after it failed"),
    "verification_failures": ("afsd_fetch_verification_failures",
                              "Reads whose bytes did not match the blob's chunk digests"),
    "errors": ("afsd_fetch_errors", "Fetches that failed on every provider"),
    "metadata_bytes": ("afsd_fetch_metadata_bytes", "Bytes read before mounts as they are and checked against "
                       "the blob's metadata digest (metadata, and the small gaps of file data read with it)"),
    "metadata_failures": ("afsd_fetch_metadata_failures", "Metadata reads that failed or did not match the "
                          "metadata digest (the prefill then fetched whole verified chunks)"),
}
PRIORITIES = ("demand", "prefetch")


class FetchMetrics(Collector):
    def __init__(self) -> None:
        self._totals: dict[str, float] = {}
        self._other_processes: list[Callable[[], Mapping[str, float]]] = []

    # -- counting, in the process that fetched ------------------------------------------------------

    def _add(self, name: str, value: float = 1) -> None:
        self._totals[name] = self._totals.get(name, 0) + value

    def bytes_read(self, source: str, count: int) -> None:
        """`count` verified bytes read from a `source` ("local" or "peer") layerstore."""
        self._add(f"bytes.{source}", count)

    def fetch_served(self, priority: str, seconds: float) -> None:
        """One fetch served, waiting included."""
        self._add(f"seconds.{priority}.count")
        self._add(f"seconds.{priority}.sum", seconds)
        bucket = next((bound for bound in SECONDS_BUCKETS if seconds <= bound), None)
        self._add(f"seconds.{priority}.le.{bucket if bucket is not None else '+Inf'}")

    def metadata_read(self, count: int) -> None:
        """`count` bytes read for a prefill and checked against the blob's metadata digest."""
        self._add("metadata_bytes", count)

    def metadata_failure(self) -> None:
        self._add("metadata_failures")

    def failover(self) -> None:
        self._add("failovers")

    def verification_failure(self) -> None:
        self._add("verification_failures")

    def error(self) -> None:
        self._add("errors")

    def totals(self) -> dict[str, float]:
        """This process's counts (what a fetch worker reports)."""
        return dict(self._totals)

    # -- the node's view -------------------------------------------------------------------------------

    def add_process(self, totals: Callable[[], Mapping[str, float]]) -> None:
        """Also report what `totals()` says other processes fetched (their latest totals)."""
        self._other_processes.append(totals)

    def _summed(self) -> dict[str, float]:
        summed = dict(self._totals)
        for totals in self._other_processes:
            for name, value in totals().items():
                summed[name] = summed.get(name, 0) + value
        return summed

    def collect(self) -> Iterator[CounterMetricFamily | HistogramMetricFamily]:
        totals = self._summed()
        read = CounterMetricFamily("afsd_fetch_bytes", "Verified blob bytes read from layerstores, by source",
                                   labels=["source"])
        for name, value in sorted(totals.items()):
            if name.startswith("bytes."):
                read.add_metric([name.removeprefix("bytes.")], value)
        yield read
        seconds = HistogramMetricFamily("afsd_fetch_seconds", "Time to serve one fetch, waiting included, by priority",
                                        labels=["priority"])
        for priority in PRIORITIES:
            if f"seconds.{priority}.count" not in totals:
                continue
            cumulative, buckets = 0.0, []
            for bound in [*SECONDS_BUCKETS, "+Inf"]:
                cumulative += totals.get(f"seconds.{priority}.le.{bound}", 0)
                buckets.append((str(float(bound)) if bound != "+Inf" else "+Inf", cumulative))
            seconds.add_metric([priority], buckets, totals.get(f"seconds.{priority}.sum", 0))
        yield seconds
        for key, (name, help_text) in _COUNTERS.items():
            family = CounterMetricFamily(name, help_text)
            family.add_metric([], totals.get(key, 0))
            yield family


FETCH_METRICS = FetchMetrics()
REGISTRY.register(FETCH_METRICS)
