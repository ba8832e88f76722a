"""Reading a daemon's Prometheus /metrics the way a scraper does, for tests."""

from __future__ import annotations

import urllib.request

from afsd.lab.daemons import Daemon, metrics_address


def scrape(address: str) -> str:
    """The text of http://ADDRESS/metrics (blocking: call it from a thread in async code)."""
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=30) as response:
        return response.read().decode()


def daemon_metrics(daemon: Daemon) -> str:
    """The /metrics of a daemon started with --metrics-listen."""
    address = metrics_address(daemon)
    assert address is not None, f"{daemon.name} serves no metrics"
    return scrape(address)


def metric(text: str, name: str, **labels: str) -> float:
    """The sum of the samples of `name` whose labels include `labels` (0 when there are none)."""
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        series, value = line.rsplit(" ", 1)
        if all(f'{key}="{wanted}"' in series for key, wanted in labels.items()):
            total += float(value)
    return total
