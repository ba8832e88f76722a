"""Benchmark of the fanotify backend: cold lazy reads vs a complete blob, and per-event cost.

    .venv/bin/python -m tests.support.fanotify_bench [--size-mib 256] [--runs 3]

Not a test (timings are noisy and machine-bound): it prints a table. Cases, each a sequential read of
one big file through a file-backed erofs mount (medians of --runs):
  complete/disk      the complete blob, page cache dropped (disk-bound)
  complete/cached    the complete blob, its file in the page cache, erofs' own cache dropped
  lazy/cold          a metadata-only blob: every data range filled on demand by the supervisor and
                     its workers from a LocalFileSource (source file in the page cache: a fast peer)
  lazy/present       the same blob once filled but still marked (another file is unread): every
                     readahead raises an event the supervisor answers at once; vs complete/cached
                     this is the cost of the kernel round trip per event
  warm               re-read from erofs' page cache (no events either way)
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from afsd.erofs.convert import convert_layer
from afsd.erofs.mount import mount_erofs, unmount
from afsd.ondemand.fanotify.blobfile import prepare_blob
from afsd.ondemand.fanotify.client import SupervisorClient
from afsd.ondemand.fanotify.settings import Settings
from afsd.ondemand.sources import LocalFileSource
from afsd.ondemand.spec import BlobSpec
from tests.support.fanotify_lab import markable_temp_root
from tests.support.tars import Layer

MiB = 1 << 20
_READ = r"""
import os, sys, time
fd = os.open(sys.argv[1], os.O_RDONLY)
if sys.argv[2] == "drop":
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
started, total = time.perf_counter(), 0
while chunk := os.read(fd, 1 << 20):
    total += len(chunk)
print(total / (time.perf_counter() - started) / 1e6)
"""


def read_mbps(path: Path, drop_file_cache: bool = False) -> float:
    out = subprocess.run([sys.executable, "-c", _READ, str(path), "drop" if drop_file_cache else "keep"],
                         capture_output=True, text=True, check=True).stdout
    return float(out)


def drop_caches() -> None:
    Path("/proc/sys/vm/drop_caches").write_text("3")


def warm(path: Path) -> None:
    with open(path, "rb") as handle:
        while handle.read(8 * MiB):
            pass


def build(directory: Path, size: int) -> tuple[BlobSpec, Path]:
    rng_data = hashlib.shake_256(b"afsd-bench").digest(size)
    # "a-unread" sorts before "big", so its data lies before big's and fill-ahead never reaches it: the
    # blob stays incomplete (still marked) after "big" is read.
    layer = Layer().dir("./").file("big", rng_data).file("a-unread", rng_data[:4 * MiB][::-1])
    layer_file = layer.write(directory / "layer.tar", "none")
    full = directory / "full.erofs"
    info = convert_layer(layer_file.path, "none", layer_file.digest, full)  # type: ignore[arg-type]
    spec = BlobSpec.of_blob(info)
    return spec, full


async def lazy_case(root: Path, spec: BlobSpec, full: Path, settings: Settings, runs: int) -> dict[str, float]:
    client = SupervisorClient(root / "state", settings)
    await client.ensure_running()
    cold, present, warm_reads, per_event_filled, per_event_present = [], [], [], [], []
    target = root / "mnt"
    target.mkdir(exist_ok=True)
    try:
        for _ in range(runs):
            blob = root / "lazy.erofs"
            blob.unlink(missing_ok=True)
            await prepare_blob(spec, blob, LocalFileSource(spec, full))
            await client.register(spec, blob, {"kind": "file", "path": str(full)})
            mount_erofs(blob, target)
            try:
                drop_caches()
                warm(full)
                before = await client.status()
                cold.append(read_mbps(target / "big"))
                after = await client.status()
                filled = after.counters["events_allowed_filled"] - before.counters["events_allowed_filled"]
                seconds = after.details["latency"]["filled"]["sum"] - before.details["latency"]["filled"]["sum"]
                per_event_filled.append(seconds / max(1, filled))
                before = after
                present.append(read_mbps(target / "big", drop_file_cache=True))
                after = await client.status()
                answered = after.counters["events_allowed_present"] - before.counters["events_allowed_present"]
                seconds = after.details["latency"]["present"]["sum"] - before.details["latency"]["present"]["sum"]
                per_event_present.append(seconds / max(1, answered))
                warm_reads.append(read_mbps(target / "big"))
            finally:
                unmount(target)
            await client.unregister(spec.name)
    finally:
        await client.shutdown()
    return {"lazy/cold": statistics.median(cold), "lazy/present": statistics.median(present),
            "warm (lazy)": statistics.median(warm_reads),
            "supervisor µs/filled event": statistics.median(per_event_filled) * 1e6,
            "supervisor µs/present event": statistics.median(per_event_present) * 1e6,
            "events per cold read": filled, "events per present read": answered}


def complete_cases(root: Path, full: Path, runs: int) -> dict[str, float]:
    target = root / "mnt-complete"
    target.mkdir(exist_ok=True)
    disk, cached, warm_reads = [], [], []
    mount_erofs(full, target)
    try:
        for _ in range(runs):
            drop_caches()
            disk.append(read_mbps(target / "big"))
            warm(full)
            cached.append(read_mbps(target / "big", drop_file_cache=True))
            warm_reads.append(read_mbps(target / "big"))
    finally:
        unmount(target)
    return {"complete/disk": statistics.median(disk), "complete/cached": statistics.median(cached),
            "warm (complete)": statistics.median(warm_reads)}


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size-mib", type=int, default=256)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="afsd-fanbench-", dir=markable_temp_root()))
    try:
        spec, full = build(root, args.size_mib * MiB)
        results = {"complete": complete_cases(root, full, args.runs)}
        for label, settings in [("fill_ahead=0", Settings(workers=2, fill_ahead=0)),
                                ("fill_ahead=4", Settings(workers=2, fill_ahead=4)),
                                ("fill_ahead=16", Settings(workers=2, fill_ahead=16))]:
            results[label] = await lazy_case(root, spec, full, settings, args.runs)
        print(f"{args.size_mib} MiB file, medians of {args.runs} runs (MB/s unless stated)")
        for label, values in results.items():
            print(f"  {label}:")
            for name, value in values.items():
                print(f"    {name:32s} {value:10.1f}")
        base = results["complete"]["complete/cached"]
        for label, values in results.items():
            if "lazy/cold" in values:
                print(f"  {label}: cold/complete-cached {values['lazy/cold'] / base:.2f}, "
                      f"present/complete-cached {values['lazy/present'] / base:.2f}, "
                      f"warm ratio {values['warm (lazy)'] / results['complete']['warm (complete)']:.2f}")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    os.chdir(Path(__file__).resolve().parents[2])
    asyncio.run(main())
