"""`python -m bench`: the scale suite. Runs the discovery benchmark (simulated layerstores) and the burst
benchmark (a simulated cluster of network-namespace nodes, afsd vs plain registry pulls) at several
sizes, then writes docs/bench/report.md, its plots and results.json, and the README's excerpt.

`--quick` (discovery at 100 and 1,000 nodes, one 8-node burst) takes under 10 minutes on the project's
2-core machine; the full run (discovery at 10-1,000 nodes, bursts of 8, 16, 32 and 64 nodes, each only
if the host has the memory for it while keeping 6 GiB free) takes about an hour. Needs root.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import burst_bench, discovery_bench
from bench._common import REPO, exit_on_sigterm, machine_facts
from bench.report import update_readme, write_report

from afsd.sim.cluster import SMALL_MALLOC

# How a node's memory was shrunk, one step at a time (each a 2-node burst without baseline).
MEMORY_VARIANTS = (("2 fetch workers, glibc defaults (afsd node's defaults)", 2, ()),
                   ("1 fetch worker, glibc defaults", 1, ()),
                   ("1 fetch worker, MALLOC_ARENA_MAX=2 + MALLOC_MMAP_THRESHOLD_=128 KiB (the simulation's)", 1,
                    SMALL_MALLOC))


def thin_timelines(results: dict, most: int = 240) -> dict:
    """Keep at most `most` samples of each burst's bytes-served timeline (evenly spaced, last one kept):
    enough for the plot, and results.json stays small enough to commit."""
    for burst in results.get("bursts", []) + results.get("memory_variants", []):
        served = burst.get("afsd", {}).get("served")
        if served and len(served) > most:
            step = len(served) / most
            burst["afsd"]["served"] = [served[int(i * step)] for i in range(most - 1)] + [served[-1]]
    return results


def _commit() -> str:
    found = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return found.stdout.strip() or "?"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the short suite (under 10 minutes)")
    parser.add_argument("--nodes", type=int, action="append", help="burst sizes (repeatable; default 8 16 32 64, "
                                                                    "--quick: 8)")
    parser.add_argument("--discovery-nodes", type=int, action="append",
                        help="simulated layerstores (repeatable; default 10 100 300 1000, --quick: 100 1000)")
    parser.add_argument("--rate-mbit", type=float, default=1000.0, help="each node's link, Mbit/s each way")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "bench")
    parser.add_argument("--no-readme", action="store_true", help="leave README.md alone")
    parser.add_argument("--render", type=Path, metavar="RESULTS_JSON",
                        help="measure nothing: write the report (and README excerpt) from an earlier results.json")
    args = parser.parse_args(argv)
    if args.render:
        results = thin_timelines(json.loads(args.render.read_text()))
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
        print(f"report written to {write_report(results, args.out)}")
        if not args.no_readme:
            update_readme(REPO / "README.md", results)
        return 0
    if os.geteuid() != 0:
        print("python -m bench: needs root (network namespaces, mounts)", file=sys.stderr)
        return 2
    exit_on_sigterm()
    started = time.monotonic()
    facts = machine_facts()
    facts["memory_gib"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / (1 << 30), 1)
    sizes = args.nodes or ([8] if args.quick else [8, 16, 32, 64])
    discovery_sizes = args.discovery_nodes or ([100, 1000] if args.quick else [10, 100, 300, 1000])
    results: dict = {"date": datetime.date.today().isoformat(), "machine": facts, "commit": _commit(),
                     "command": " ".join(["python -m bench", *(sys.argv[1:] if argv is None else argv)]), "rate_mbit": args.rate_mbit}
    print(f"discovery at {discovery_sizes} simulated layerstores", flush=True)
    results["discovery"] = discovery_bench.run(discovery_sizes, queries=50 if args.quick else 200)
    results["bursts"] = []
    results["memory_variants"] = []
    workdir = Path(tempfile.mkdtemp(prefix="afsd-bench-"))
    try:
        if not args.quick:
            for name, workers, env in MEMORY_VARIANTS:
                print(f"memory: a 2-node burst, {name}", flush=True)
                outcome = burst_bench.run_one(2, workdir, rate_bits=int(args.rate_mbit * 1e6) or None,
                                              baseline=False, fetch_workers=workers, env=env)
                outcome["variant"] = name
                results["memory_variants"].append(outcome)
        queue, tried_fitting = sorted(sizes), False
        while queue:
            nodes = queue.pop(0)
            print(f"burst onto {nodes} nodes", flush=True)
            outcome = burst_bench.run_one(nodes, workdir, rate_bits=int(args.rate_mbit * 1e6) or None)
            results["bursts"].append(outcome)
            print(f"   {outcome.get('skipped') or outcome['afsd']['summary']}", flush=True)
            largest_run = max((b["nodes"] for b in results["bursts"] if "afsd" in b), default=0)
            fitting = burst_bench.largest_fitting()
            if "skipped" in outcome and largest_run < fitting < nodes and not args.nodes and not tried_fitting:
                tried_fitting = True
                queue.insert(0, fitting)  # the largest cluster that does fit, for the record
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    results["seconds"] = time.monotonic() - started
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(thin_timelines(results), indent=1) + "\n")
    report = write_report(results, args.out)
    if not args.no_readme:
        update_readme(REPO / "README.md", results)
    print(f"report written to {report} ({results['seconds'] / 60:.1f} minutes)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
