"""Row 4: cold 4 KiB random reads through a fanotify-served erofs mount, latency per miss, afsd against a
minimal C listener (fanlisten.c, compiled here with gcc) answering from the same local file.

The blob is the holder's blob of one layer with a `size_mib` MiB file of random bytes; its chunk table is
recomputed at 4 KiB so that one page read is one miss and one fill of exactly that page in both cases
(afsd: the fanotify supervisor with `fill_ahead` 0 and a local-file source, which checks each chunk's
digest; C: pread + pwrite through the event fd, no checks). Each case gets a fresh sparse copy of the
blob with its metadata present (`prepare_blob`), is mounted file-backed, the page cache is dropped, and
a reader process times `reads` preads of distinct random pages of the file (POSIX_FADV_RANDOM: no
readahead), one at a time. p50 and p99 per read; ratio = afsd ÷ C.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import random
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from afsd.erofs.mount import mount_erofs, unmount
from afsd.ondemand.fanotify.client import SupervisorClient, prepare_blob
from afsd.ondemand.fanotify.settings import Settings
from afsd.ondemand.sources import LocalFileSource
from afsd.ondemand.spec import BlobSpec
from bench._common import MIB, drop_caches, percentile, write_random_file
from bench.datapath._lab import BenchLab
from bench.datapath._report import Row, Section

PAGE = 4096
FILE = "data/random.bin"
LISTENER_SOURCE = Path(__file__).with_name("fanlisten.c")

# The reader: open, stat, advise random, then time each pread (microseconds), one JSON list on stdout.
_READER = r"""
import json, os, sys, time
fd = os.open(sys.argv[1], os.O_RDONLY)
os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
pages = json.loads(sys.argv[2])
latencies = []
for page in pages:
    started = time.perf_counter_ns()
    if len(os.pread(fd, 4096, page * 4096)) != 4096:
        raise SystemExit(f"short read at page {page}")
    latencies.append((time.perf_counter_ns() - started) / 1000)
print(json.dumps(latencies))
"""


def measure(lab: BenchLab, size_mib: int, reads: int, repeats: int) -> Section:
    section = Section("cold 4 KiB random reads, local provider")
    if shutil.which("gcc") is None:
        section.skipped = "gcc is not installed (scripts/setup.sh installs build-essential)"
        return section
    listener = lab.work / "fanlisten"
    subprocess.run(["gcc", "-O2", "-o", str(listener), str(LISTENER_SOURCE)], check=True, capture_output=True)
    content = write_random_file(lab.work / "random.bin", size_mib * MIB)
    (held,) = lab.hold(lab.push("random", {FILE: content}))
    content.unlink()
    spec = rechunked(held.spec, held.path, PAGE)
    rng = random.Random(14)
    latencies: dict[str, list[float]] = {"C listener": [], "afsd": []}
    events: list[int] = []
    for index in range(repeats):
        pages = rng.sample(range(size_mib * MIB // PAGE), reads)
        latencies["C listener"] += _with_c_listener(lab.work / f"random-c{index}", listener, spec, held.path, pages)
        afsd_latencies, afsd_events = asyncio.run(_with_afsd(lab.work / f"random-a{index}", spec, held.path, pages))
        latencies["afsd"] += afsd_latencies
        events.append(afsd_events)
    stats = {name: {"p50_us": percentile(values, 0.5), "p99_us": percentile(values, 0.99), "reads": len(values)}
             for name, values in latencies.items()}
    print(f"\n{section.title}: {repeats} x {reads} distinct pages of a {size_mib} MiB file; afsd events per pass "
          f"{events}; " + "; ".join(f"{name} p50 {s['p50_us']:.0f} µs, p99 {s['p99_us']:.0f} µs"
                                   for name, s in stats.items()))
    details: dict[str, Any] = {"stats": stats, "afsd_events": events, "latencies_us": latencies}
    for quantile in ("p50", "p99"):
        afsd, c = stats["afsd"][f"{quantile}_us"], stats["C listener"][f"{quantile}_us"]
        section.rows.append(Row(f"cold 4 KiB random read, {quantile} per miss", f"{afsd:,.0f} µs",
                                f"{c:,.0f} µs C fanotify listener", afsd / c, "p50 ≤ 2" if quantile == "p50" else "-",
                                details=details if quantile == "p50" else {}))
    return section


def rechunked(spec: BlobSpec, blob: Path, chunk_size: int) -> BlobSpec:
    """`spec` with its chunk table recomputed at `chunk_size` from the complete blob file."""
    data = blob.read_bytes()
    digests = tuple(hashlib.sha256(data[at:at + chunk_size]).digest() for at in range(0, len(data), chunk_size))
    return dataclasses.replace(spec, chunk_size=chunk_size, chunk_digests=digests)


def _read_pages(path: Path, pages: list[int]) -> list[float]:
    result = subprocess.run([sys.executable, "-c", _READER, str(path), json.dumps(pages)], capture_output=True,
                            text=True, timeout=600)
    if result.returncode != 0:
        raise RuntimeError(f"random reader failed: {result.stderr.strip()[-500:]}")
    return json.loads(result.stdout)


def _with_c_listener(root: Path, listener: Path, spec: BlobSpec, full: Path, pages: list[int]) -> list[float]:
    root.mkdir()
    blob, target = root / "blob.erofs", root / "mnt"
    target.mkdir()
    asyncio.run(prepare_blob(spec, blob, LocalFileSource(spec, full)))
    process = subprocess.Popen([str(listener), str(blob), str(full)], stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        if process.stdout.readline().strip() != "ready":
            raise RuntimeError("the C listener did not start")
        mount_erofs(blob, target)
        try:
            (target / FILE).stat()
            drop_caches()
            return _read_pages(target / FILE, pages)
        finally:
            unmount(target)
    finally:
        process.kill()
        process.wait()


async def _with_afsd(root: Path, spec: BlobSpec, full: Path, pages: list[int]) -> tuple[list[float], int]:
    root.mkdir()
    blob, target = root / "blob.erofs", root / "mnt"
    target.mkdir()
    client = SupervisorClient(root / "state", Settings(fill_ahead=0))
    await client.ensure_running()
    try:
        await prepare_blob(spec, blob, LocalFileSource(spec, full))
        await client.register(spec, blob, {"kind": "file", "path": str(full)})
        await asyncio.to_thread(mount_erofs, blob, target)
        try:
            await asyncio.to_thread((target / FILE).stat)
            await asyncio.to_thread(drop_caches)
            before = (await client.status()).counters["events_total"]
            latencies = await asyncio.to_thread(_read_pages, target / FILE, pages)
            events = (await client.status()).counters["events_total"] - before
        finally:
            await asyncio.to_thread(unmount, target)
        await client.unregister(spec.name, force=True)
    finally:
        await client.shutdown(force=True)
    return latencies, events
