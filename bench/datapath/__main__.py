"""`python -m bench.datapath`: run the data-path rows and print each against its baseline (see __init__)."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

from bench._common import exit_on_sigterm, machine_facts, require, write_json
from bench.datapath import kernel_reads, learned, random_reads, task, transport, ttfb, vm
from bench.datapath._lab import BenchLab, remove_work
from bench.datapath._report import Section, print_summary

ROWS = ("transport", "sequential", "random", "ttfb", "task", "learned", "vm")
# (quick, full) settings per row.
SIZES: dict[str, tuple[dict[str, int], dict[str, int]]] = {
    "transport": ({"size_mib": 128, "repeats": 2}, {"size_mib": 256, "repeats": 5}),
    "sequential": ({"size_mib": 64, "repeats": 2}, {"size_mib": 256, "repeats": 5}),
    "random": ({"size_mib": 32, "reads": 200, "repeats": 1}, {"size_mib": 64, "reads": 1000, "repeats": 2}),
    "ttfb": ({"size_mib": 64, "repeats": 2}, {"size_mib": 256, "repeats": 3}),
    "task": ({"cold_repeats": 1, "warm_runs": 3}, {"cold_repeats": 3, "warm_runs": 5}),
    "learned": ({"repeats": 1, "warm_runs": 3}, {"repeats": 3, "warm_runs": 5}),
}


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.datapath", description=sys.modules["bench.datapath"].__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller files and fewer repeats (a few minutes)")
    parser.add_argument("--only", default=",".join(ROWS), help=f"comma-separated rows to run (default: all of {', '.join(ROWS)})")
    parser.add_argument("--vm", choices=("auto", "yes", "no"), default="auto",
                        help="the fscache row in the lab VM: auto = when the lab kernel is built (default)")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write every number here")
    parser.add_argument("--workdir", type=Path, default=Path("/var/tmp"),
                        help="where the temp dir goes; must be ext4/xfs/btrfs for fanotify (default %(default)s)")
    args = parser.parse_args()
    rows = [row.strip() for row in args.only.split(",") if row.strip()]
    unknown = sorted(set(rows) - set(ROWS))
    if unknown:
        parser.error(f"unknown row(s) {', '.join(unknown)}; choose from {', '.join(ROWS)}")
    if os.geteuid() != 0:
        sys.exit("run as root: the bench mounts filesystems, drops the page cache and runs containers")
    require("docker-registry", "skopeo", "mkfs.erofs", "runc")
    exit_on_sigterm()

    settings = {row: SIZES[row][0 if args.quick else 1] for row in SIZES}
    document: dict[str, Any] = {"benchmark": "datapath", "quick": args.quick, "settings": settings,
                                "machine_before": machine_facts(), "sections": {}}
    print(f"data-path bench ({'quick' if args.quick else 'full'}): rows {', '.join(rows)}; "
          f"load average {document['machine_before']['load_average_1_5_15']} on {os.cpu_count()} CPUs", flush=True)
    sections: list[Section] = []
    started = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="afsd-datapath-", dir=args.workdir))
    lab: BenchLab | None = None
    try:
        cluster_rows = [row for row in rows if row != "vm"]
        if cluster_rows:
            lab = BenchLab.start(work)
        for row in rows:
            load_before = os.getloadavg()
            try:
                section = _measure(row, lab, settings, args)
            except Exception as error:   # noqa: BLE001 - one broken row must not cost the others
                traceback.print_exc()
                section = Section(row, skipped=f"failed: {type(error).__name__}: {str(error)[:300]}")
            sections.append(section)
            document["sections"][row] = {"title": section.title, "skipped": section.skipped,
                                         "load_before": load_before, "load_after": os.getloadavg(),
                                         "rows": [r.to_json() for r in section.rows]}
    finally:
        if lab is not None:
            lab.close()
        remove_work(work)

    document["machine_after"] = machine_facts()
    document["seconds"] = time.monotonic() - started
    print(f"\nsummary ({'quick' if args.quick else 'full'} run, {document['seconds']:.0f} s; load average before "
          f"{document['machine_before']['load_average_1_5_15']}, after {document['machine_after']['load_average_1_5_15']} "
          f"on {os.cpu_count()} CPUs: other work shares these cores, so compare ratios)")
    print_summary(sections)
    for row, section in document["sections"].items():
        print(f"  load during {row}: {section['load_before'][0]:.2f} -> {section['load_after'][0]:.2f} (1-min average)")
    write_json(args.json, document)
    return 0


def _measure(row: str, lab: BenchLab | None, settings: dict[str, dict[str, int]], args: argparse.Namespace) -> Section:
    if row == "vm":
        return vm.measure(args.quick, args.vm)
    assert lab is not None
    measure = {"transport": transport.measure, "sequential": kernel_reads.measure, "random": random_reads.measure,
               "ttfb": ttfb.measure, "task": task.measure, "learned": learned.measure}[row]
    return measure(lab, **settings[row])


if __name__ == "__main__":
    sys.exit(main())
