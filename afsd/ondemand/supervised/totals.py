"""Counters that workers report as totals since they started, added up over every worker a supervisor ran.

Both supervised backends' workers send their counters with each heartbeat (protocol.Heartbeat) as running
totals, never as deltas, so a lost or late message loses nothing: the supervisor keeps each live worker's
latest totals and, when a worker is gone, folds its last ones into what the gone workers did.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping


class WorkerTotals:
    def __init__(self) -> None:
        self._gone: dict[str, float] = {}
        self._live: dict[Hashable, dict[str, float]] = {}

    def report(self, worker: Hashable, counters: Mapping[str, float]) -> None:
        """`worker`'s totals as of now (they replace what it reported before)."""
        self._live[worker] = dict(counters)

    def retire(self, worker: Hashable) -> None:
        """`worker` is gone: what it reported last stays counted; what it did after that is lost."""
        for name, value in self._live.pop(worker, {}).items():
            self._gone[name] = self._gone.get(name, 0) + value

    def totals(self, names: Mapping[str, object] | None = None) -> dict[str, float]:
        """The sums over every worker, gone and live (with `names`: exactly those counters, 0 if unseen)."""
        summed = dict(self._gone)
        for counters in self._live.values():
            for name, value in counters.items():
                summed[name] = summed.get(name, 0) + value
        return summed if names is None else {name: summed.get(name, 0) for name in names}
