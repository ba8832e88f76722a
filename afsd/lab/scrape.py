"""Reading a daemon's Prometheus /metrics the way a scraper does (tests, the simulated cluster, benches)."""

from __future__ import annotations

import urllib.request


def scrape(address: str, timeout: float = 30.0) -> str:
    """The text of http://ADDRESS/metrics (blocking: call it from a thread in async code)."""
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=timeout) as response:
        return response.read().decode()


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


def by_label(text: str, name: str, label: str) -> dict[str, float]:
    """The samples of `name` summed per value of `label`."""
    totals: dict[str, float] = {}
    marker = f'{label}="'
    for line in text.splitlines():
        if not line.startswith(name + "{") or marker not in line:
            continue
        series, value = line.rsplit(" ", 1)
        key = series.split(marker, 1)[1].split('"', 1)[0]
        totals[key] = totals.get(key, 0.0) + float(value)
    return totals
