"""Reading a daemon's Prometheus /metrics the way a scraper does, for tests."""

from __future__ import annotations

from afsd.lab.daemons import Daemon, metrics_address
from afsd.lab.scrape import metric, scrape

__all__ = ["daemon_metrics", "metric", "scrape"]


def daemon_metrics(daemon: Daemon) -> str:
    """The /metrics of a daemon started with --metrics-listen."""
    address = metrics_address(daemon)
    assert address is not None, f"{daemon.name} serves no metrics"
    return scrape(address)
