"""Benchmark of `afsd proxy`'s dispatch overhead: Execute of `true` through the proxy vs straight to an afslet.

What it measures: the test cluster of tests/support/proxy.py, as separate processes on loopback — a
docker-registry, discovery, a layerstore, a node daemon, `--afslets` afslets on 127.0.0.2, 127.0.0.3 ...
behind a DNS name served by dnsmasq, and one proxy (`--strategy`, p2c by default). One published afs-sdk
client per path (its own process, sdk_client.py's "repeat" op) runs `--count` Executes of `true` in the
busybox test image in a row (cpu_cores=1, memory_mb=256), timing each from its first frame to `done`.
Direct runs (to the first afslet) and proxied runs alternate for `--rounds` rounds, so drift on a busy
machine hits both alike; five calls per path warm up first (image resolution, mounts, channels).

Baseline, same run: the direct path. `ratio` = proxied / direct at p50 and p95 (1.0: the proxy costs
nothing). `dispatch alone` is the proxy's own `afsd_proxy_dispatch_seconds` (DNS lookup, every afslet's
GetRuntimeStatus in parallel, the handshake up to `accepted`), mean over the proxied calls; the rest of
the difference is relaying the call's frames through a second gRPC hop.

Run as root (runc, mounts, cgroups): `.venv/bin/python bench/proxy_bench.py [--count 50] [--rounds 3]
[--json out.json]`. Everything it starts (daemons, dnsmasq, mounts, containers, the temp dir) is stopped
and removed at exit, SIGTERM included. The machine has 2 cores shared by every daemon and client, and
other work may be running: compare ratios, not absolute numbers.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import urllib.request
from pathlib import Path

from _common import exit_on_sigterm, machine_facts, percentile, print_table, require, write_json

from afsd.lab.daemons import Daemon, http_address
from tests.support.afslet import SdkCall
from tests.support.proxy import ProxySdkCall, metric, start_proxy_cluster

WARM_UP_CALLS = 5


def run_calls(target: Daemon, count: int, image: str, *, through_proxy: bool) -> list[float]:
    """Milliseconds per Execute of `true`, `count` in a row from one afs-sdk client."""
    request = {"address": target.address, "op": "repeat", "count": count,
               "input": {"image": image, "command": ["true"], "cpu_cores": 1, "memory_mb": 256, "timeout_ms": 10_000}}
    runs = (ProxySdkCall(request) if through_proxy else SdkCall(request)).finish().of("run")
    failed = [run for run in runs if run["exit_code"] != 0]
    if len(runs) != count or failed:
        raise RuntimeError(f"expected {count} runs of `true` with exit code 0, got {len(runs)}: {failed[:3]}")
    return [run["seconds"] * 1000 for run in runs]


def dispatch_seconds(proxy: Daemon) -> tuple[float, float]:
    """The proxy's afsd_proxy_dispatch_seconds histogram: (sum, count)."""
    with urllib.request.urlopen(f"http://{http_address(proxy)}/metrics", timeout=30) as response:
        text = response.read().decode()
    return metric(text, "afsd_proxy_dispatch_seconds_sum"), metric(text, "afsd_proxy_dispatch_seconds_count")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=50, help="Executes per path per round (default %(default)s)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds (default %(default)s)")
    parser.add_argument("--afslets", type=int, default=3, help="afslets behind the proxy (default %(default)s)")
    parser.add_argument("--strategy", default="p2c", help="the proxy's --strategy (default %(default)s)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    if args.count < 1 or args.rounds < 1 or not 1 <= args.afslets <= 200:
        parser.error("--count and --rounds must be >= 1, --afslets between 1 and 200")
    require("runc", "dnsmasq", "docker-registry", "skopeo")
    exit_on_sigterm()

    workdir = Path(tempfile.mkdtemp(prefix="afsd-proxy-bench-"))
    hosts = [f"127.0.0.{2 + n}" for n in range(args.afslets)]
    cluster = None
    try:
        cluster = start_proxy_cluster(workdir, hosts)
        proxy = cluster.start_proxy("proxy-bench", extra_args=["--strategy", args.strategy])
        image = cluster.base.images["tools"]
        afslet = cluster.afslets[hosts[0]]
        run_calls(afslet, WARM_UP_CALLS, image, through_proxy=False)
        run_calls(proxy, WARM_UP_CALLS, image, through_proxy=True)
        warm_sum, warm_count = dispatch_seconds(proxy)

        direct: list[float] = []
        proxied: list[float] = []
        for round_number in range(1, args.rounds + 1):
            direct += run_calls(afslet, args.count, image, through_proxy=False)
            proxied += run_calls(proxy, args.count, image, through_proxy=True)
            print(f"round {round_number}/{args.rounds} done", file=sys.stderr, flush=True)
        total_sum, total_count = dispatch_seconds(proxy)
        dispatch_ms = (total_sum - warm_sum) / (total_count - warm_count) * 1000
    finally:
        if cluster is not None:
            cluster.stop()
        shutil.rmtree(workdir, ignore_errors=True)

    p50 = (percentile(direct, 0.5), percentile(proxied, 0.5))
    p95 = (percentile(direct, 0.95), percentile(proxied, 0.95))
    print(f"\nExecute of `true`, {args.rounds} rounds x {args.count} calls per path, {args.afslets} afslets, "
          f"proxy --strategy {args.strategy}")
    print_table(["path", "calls", "p50 ms", "p95 ms"],
                [["straight to an afslet", len(direct), p50[0], p95[0]],
                 ["through the proxy", len(proxied), p50[1], p95[1]],
                 ["ratio proxy / direct", "", p50[1] / p50[0], p95[1] / p95[0]]])
    print(f"\nadded at p50: {p50[1] - p50[0]:+.1f} ms; dispatch alone (DNS, statuses, handshake): mean "
          f"{dispatch_ms:.1f} ms")
    write_json(args.json, {
        "benchmark": "proxy_dispatch", "machine": machine_facts(),
        "settings": {"count": args.count, "rounds": args.rounds, "afslets": args.afslets, "strategy": args.strategy},
        "direct_ms": {"p50": p50[0], "p95": p95[0]}, "proxied_ms": {"p50": p50[1], "p95": p95[1]},
        "ratio": {"p50": p50[1] / p50[0], "p95": p95[1] / p95[0]}, "dispatch_mean_ms": dispatch_ms})
    return 0


if __name__ == "__main__":
    sys.exit(main())
