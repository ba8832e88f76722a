"""Benchmark of the fscache (cachefiles on-demand) backend against reading the same blob mounted locally.

What it measures, in one VM (or on a machine booted into a kernel with on-demand mode), every number
against a baseline taken in the same run (ratios; under qemu's TCG the absolute numbers mean little):

  local cold    a 256 MiB file in an erofs image made by mkfs.erofs, the image mounted file-backed
                (mount(2) of the image file), page cache dropped, read sequentially in 1 MiB reads
  fscache cold  the same image registered with afsd's fscache supervisor under a new name (an empty
                cache file), its source a local file (the "file" source: read + sha256 per 1 MiB chunk,
                as a peer's bytes would be checked), mounted with -o fsid=..., page cache dropped:
                every byte comes through the worker (READ requests, and fills ahead of the reader
                once its READs show it sequential) -> pwrite into the cache file
  fscache warm  the same mount read again after dropping the page cache: the kernel reads the now
                whole cache file itself, no request reaches the daemon (READ count checked)
  local hot / fscache hot   a re-read with the file in the page cache (no disk, no daemon)
  4 KiB random  the image registered with 4 KiB chunks and `read_unit` 4 KiB, so each random 4 KiB
                pread (POSIX_FADV_RANDOM: no readahead) of a not yet cached page is one READ request:
                requests the daemon completed per second, with 1 and with 8 reading threads; the same
                page reads from the local mount (page cache dropped) are the baseline

Ratios: fscache MB/s / local MB/s (1.0 = as fast as the local blob). Each sequential case is the
median of --runs runs; each run reads local, then fscache (a fresh supervisor and cache file), so both
cases of a run see the same load on the host.

Run it:
  .venv/bin/python bench/fscache_bench.py            on this host: boots the lab VM (scripts/vm-test.sh)
                                                     and runs it there with the defaults below
  .venv/bin/python bench/fscache_bench.py --size-mib 64 --runs 2    where /dev/cachefiles exists (as root)
Everything lives in one temp directory on a disk filesystem; mounts and the supervisor are removed at exit.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from afsd.erofs.mount import mount_erofs, unmount
from afsd.ondemand.cachefiles import FscacheClient, Settings, mount_fscache
from tests.vm.test_cachefiles_helpers import renamed, spec_for_file

MIB = 1 << 20
PAGE = 4096
DEFAULT_SIZE_MIB = 256
DEFAULT_RUNS = 3
QUICK_SIZE_MIB = 64
QUICK_RUNS = 2
RANDOM_READS = 1500


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3")


def read_sequentially(path: Path) -> float:
    """MB/s of reading `path` start to end in 1 MiB reads."""
    started, total = time.perf_counter(), 0
    fd = os.open(path, os.O_RDONLY)
    try:
        while chunk := os.read(fd, MIB):
            total += len(chunk)
    finally:
        os.close(fd)
    return total / (time.perf_counter() - started) / 1e6


def read_random_pages(path: Path, pages: list[int], threads: int) -> float:
    """Seconds to pread each page in `pages` once (4 KiB each, no readahead), spread over `threads`."""
    fd = os.open(path, os.O_RDONLY)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
    errors: list[BaseException] = []

    def work(mine: list[int]) -> None:
        try:
            for page in mine:
                if len(os.pread(fd, PAGE, page * PAGE)) != PAGE:
                    raise OSError(f"short read at page {page}")
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    workers = [threading.Thread(target=work, args=(pages[i::threads],)) for i in range(threads)]
    started = time.perf_counter()
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    elapsed = time.perf_counter() - started
    os.close(fd)
    if errors:
        raise errors[0]
    return elapsed


def build_image(root: Path, size: int) -> tuple[Path, str]:
    tree = root / "tree"
    tree.mkdir()
    rng = random.Random(2026)
    with open(tree / "big.bin", "wb") as out:
        out.writelines(rng.randbytes(MIB) for _ in range(size // MIB))
    image = root / "image.erofs"
    subprocess.run(["mkfs.erofs", "--quiet", "-T0", str(image), str(tree)], check=True)
    shutil.rmtree(tree)
    return image, "big.bin"


async def sequential_cases(root: Path, image: Path, name: str, runs: int) -> dict[str, Any]:
    local_mount = root / "local"
    local_mount.mkdir()
    results: dict[str, list[float]] = {"local cold": [], "local hot": [], "fscache cold": [], "fscache warm": [],
                                       "fscache hot": []}
    reads_when_warm: list[float] = []
    cold_reads = 0
    base = spec_for_file(image, "bench")
    mount_erofs(image, local_mount)
    try:
        # Each run reads the local mount and then the fscache mount, one right after the other: both see
        # the same load on the (shared) host, which the VM's emulated CPUs feel at once. The supervisor
        # runs only while fscache is read.
        for run in range(runs):
            drop_caches()
            results["local cold"].append(read_sequentially(local_mount / name))
            results["local hot"].append(read_sequentially(local_mount / name))
            client = FscacheClient(root / f"st{run}", settings=Settings())
            await client.ensure_running()
            try:
                spec = renamed(base, f"run{run}")   # a new name: a new, empty cache file
                await client.register(spec, {"kind": "file", "path": str(image)}, prefetch=False)
                target = root / f"fscache{run}"
                target.mkdir()
                await asyncio.to_thread(mount_fscache, spec.name, target)
                try:
                    drop_caches()
                    results["fscache cold"].append(await asyncio.to_thread(read_sequentially, target / name))
                    before = (await client.status()).counters["requests_read"]
                    cold_reads += before
                    drop_caches()
                    results["fscache warm"].append(await asyncio.to_thread(read_sequentially, target / name))
                    reads_when_warm.append((await client.status()).counters["requests_read"] - before)
                    results["fscache hot"].append(await asyncio.to_thread(read_sequentially, target / name))
                finally:
                    await asyncio.to_thread(unmount, target)
                await client.unregister(spec.name)
            finally:
                await client.shutdown(force=True)
    finally:
        unmount(local_mount)
    medians = {case: statistics.median(values) for case, values in results.items()}
    return {"mb_per_s": medians, "runs": results, "read_requests_when_warm": reads_when_warm,
            "read_requests_cold_total": cold_reads,
            "ratios": {"fscache cold / local cold": medians["fscache cold"] / medians["local cold"],
                       "fscache warm / local cold": medians["fscache warm"] / medians["local cold"],
                       "fscache hot / local hot": medians["fscache hot"] / medians["local hot"]}}


async def random_case(root: Path, image: Path, name: str, size: int) -> dict[str, Any]:
    pages_in_file = size // PAGE
    rng = random.Random(7)
    results: dict[str, Any] = {}
    local_mount = root / "local-random"
    local_mount.mkdir()
    mount_erofs(image, local_mount)
    try:
        for threads in (1, 8):
            drop_caches()
            pages = rng.sample(range(pages_in_file), RANDOM_READS)
            seconds = await asyncio.to_thread(read_random_pages, local_mount / name, pages, threads)
            results[f"local, {threads} thread(s)"] = {"reads": len(pages), "requests": 0, "seconds": seconds,
                                                      "reads_per_s": len(pages) / seconds, "requests_per_s": 0.0,
                                                      "us_per_read": seconds / len(pages) * 1e6}
    finally:
        unmount(local_mount)
    # 4 KiB chunks and read units: one random page read = one READ request of 4 KiB.
    client = FscacheClient(root / "st4k", settings=Settings(read_unit=PAGE))
    await client.ensure_running()
    base = spec_for_file(image, "bench-random", chunk_size=PAGE)
    try:
        for threads in (1, 8):
            spec = renamed(base, f"threads{threads}")
            await client.register(spec, {"kind": "file", "path": str(image)}, prefetch=False)
            target = root / f"random{threads}"
            target.mkdir()
            await asyncio.to_thread(mount_fscache, spec.name, target)
            try:
                await asyncio.to_thread(os.stat, target / name)   # metadata first: not part of the count
                drop_caches()
                pages = rng.sample(range(pages_in_file), RANDOM_READS)
                before = (await client.status()).counters["requests_read"]
                seconds = await asyncio.to_thread(read_random_pages, target / name, pages, threads)
                requests = (await client.status()).counters["requests_read"] - before
            finally:
                await asyncio.to_thread(unmount, target)
            await client.unregister(spec.name)
            results[f"fscache, {threads} thread(s)"] = {"reads": len(pages), "requests": requests, "seconds": seconds,
                                                        "reads_per_s": len(pages) / seconds,
                                                        "requests_per_s": requests / seconds,
                                                        "us_per_read": seconds / len(pages) * 1e6}
    finally:
        await client.shutdown(force=True)
    return results


def print_report(report: dict[str, Any]) -> None:
    sequential, random_reads = report["sequential"], report["random"]
    print(f"\nfscache benchmark: {report['size_mib']} MiB file, {report['runs']} runs, kernel {report['kernel']}, "
          f"{report['cpus']} CPUs")
    print(f"{'case':<16}{'MB/s (median)':>15}")
    for case, value in sequential["mb_per_s"].items():
        print(f"{case:<16}{value:>15.1f}")
    for ratio, value in sequential["ratios"].items():
        print(f"{ratio:<28}{value:>7.2f}")
    print(f"READ requests while reading warm (should be 0): {sequential['read_requests_when_warm']}")
    print(f"{'4 KiB random reads':<24}{'reads/s':>9}{'READ requests':>15}{'requests/s':>12}{'µs/read':>10}")
    for case, value in random_reads.items():
        print(f"{case:<24}{value['reads_per_s']:>9.0f}{value['requests']:>15}{value['requests_per_s']:>12.0f}"
              f"{value['us_per_read']:>10.0f}")
    print("fscache-bench-json: " + json.dumps(report))


def run(size_mib: int, runs: int, work_root: Path | None = None) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix="fsb-", dir=work_root))   # short: unix socket paths live below
    try:
        image, name = build_image(root, size_mib * MIB)
        report = {"size_mib": size_mib, "runs": runs, "kernel": os.uname().release, "cpus": os.cpu_count(),
                  "sequential": asyncio.run(sequential_cases(root, image, name, runs)),
                  "random": asyncio.run(random_case(root, image, name, size_mib * MIB))}
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print_report(report)
    return report


@pytest.mark.timeout(3600)   # a benchmark under TCG, on a shared machine: minutes, not the tests' 600 s
@pytest.mark.parametrize("size_mib, runs", [pytest.param(DEFAULT_SIZE_MIB, DEFAULT_RUNS, id="full"),
                                             pytest.param(QUICK_SIZE_MIB, QUICK_RUNS, id="quick")])
def test_fscache_benchmark(tmp_path: Path, size_mib: int, runs: int) -> None:
    """The VM's entry points (scripts/vm-test.sh 'bench/fscache_bench.py::test_fscache_benchmark[full]' -s), on
    its ext4 disk: `full` the defaults, `quick` a smaller run (bench/datapath's --quick)."""
    report = run(size_mib, runs, tmp_path)
    assert report["sequential"]["read_requests_when_warm"] == [0] * runs
    assert all(case["requests"] == case["reads"] for name, case in report["random"].items() if "fscache" in name)


def vm_pytest_args(case: str) -> list[str]:
    """What scripts/vm-test.sh runs in the VM for one case of `test_fscache_benchmark` (full or quick)."""
    return [f"bench/fscache_bench.py::test_fscache_benchmark[{case}]", "-q", "-s", "-p", "no:cacheprovider",
            "--color=no"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size-mib", type=int, default=DEFAULT_SIZE_MIB)
    parser.add_argument("--runs", type=int, default=DEFAULT_RUNS)
    parser.add_argument("--json", type=Path, help="also write the report here")
    args = parser.parse_args()
    if not os.path.exists("/dev/cachefiles"):
        if (args.size_mib, args.runs, args.json) != (DEFAULT_SIZE_MIB, DEFAULT_RUNS, None):
            sys.exit("this kernel has no /dev/cachefiles: run without options to benchmark the defaults in the lab VM")
        os.execv(str(REPO / "scripts" / "vm-test.sh"), [str(REPO / "scripts" / "vm-test.sh"), *vm_pytest_args("full")])
    report = run(args.size_mib, args.runs)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
