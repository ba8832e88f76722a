"""Rows 2, 7 and 8: a sequential read through a fanotify mount whose image only a peer holds, cold and
warm, against a local erofs mount of the complete blob; and the CPU it cost, per GiB.

Baseline and afsd are measured back to back in every repeat, under the same conditions, and each ratio is
the median of the repeats' own ratios (their spread is printed): the machine is shared, and a cold read's
speed moves with what else runs and with what the host still caches of the virtual disk (measured: the
same local cold read at 607 MB/s in one run, 1,283 MB/s in the next), so a baseline taken minutes away
from what it is compared with says little.

One repeat:
- local cold: the holder's blob file mounted file-backed (as afsd mounts its blobs), the page cache
  dropped (`sync`, then drop_caches; the blob file's pages still resident afterwards are counted and
  printed: they should be 0), the large file read start to end in 4 MiB reads;
- afsd cold: a fresh `afsd node` (nothing of the image on it, no background prefetch, no learned
  prefetch: an earlier repeat's trace would fill the file before it is read) mounts the image with the
  fanotify backend; once the node's processes are idle (what they still do for the mount is printed, not
  counted as a cost of the read), the page cache is dropped the same way and the file read the same way.
  Meanwhile it counts the CPU seconds of the holder layerstore and of every process of the node (the
  daemon, the fanotify supervisor and keeper, the fetch workers: each names the node's state directory on
  its command line) and the bytes the holder served. The holder reads the same blob file from disk as
  the local read did;
- warm: with both mounts up, the file read `WARM_PASSES` times on each, alternating (one warm read of
  256 MiB takes tens of ms: a single one is mostly noise); the repeat's value is each side's median.
"""

from __future__ import annotations

import statistics
import subprocess
from pathlib import Path
from typing import Any

from afsd.erofs.mount import mount_erofs, unmount
from bench._common import MB, MIB, drop_caches, read_all, write_random_file
from bench.datapath._lab import (BenchLab, CpuMeter, bytes_served, daemon_pid, node_state_dir,
                                 pids_whose_command_line_has, wait_idle)
from bench.datapath._report import Row, Section, paired_ratios, ratio_label, spread

GIB = 1 << 30
FILE = "data/big.bin"
WARM_PASSES = 3


def measure(lab: BenchLab, size_mib: int, repeats: int) -> Section:
    section = Section("cold sequential read through fanotify")
    content = write_random_file(lab.work / "sequential.bin", size_mib * MIB)
    reference = lab.push("sequential", {FILE: content})
    content.unlink()
    (held,) = lab.hold(reference)

    runs: dict[str, list[float]] = {"local cold": [], "cold": [], "local warm": [], "warm": []}
    resident: list[int] = []   # bytes of the holder's blob file in the page cache right after each drop
    cpu: dict[str, float] = {"holder": 0.0, "node": 0.0, "node_settling": 0.0}
    served = 0.0
    for index in range(repeats):
        local = lab.work / f"seq-local-{index}"
        local.mkdir()
        mount_erofs(held.path, local)
        node = None
        target = lab.work / f"seq-mnt-{index}"
        try:
            resident.append(drop_and_check(held.path))
            runs["local cold"].append(megabytes_per_second(local / FILE))

            node = lab.node("seq", extra_args=["--no-learned-prefetch"])   # (after: its start-up is no load here)
            lab.mount(node, reference, target)
            holder_cpu = CpuMeter(lambda: [daemon_pid(lab.holder)])
            state = node_state_dir(node)
            cpu["node_settling"] += wait_idle(lambda: pids_whose_command_line_has(state))
            node_cpu = CpuMeter(lambda: pids_whose_command_line_has(state))
            resident.append(drop_and_check(held.path))
            served_before = bytes_served(lab.holder)
            holder_cpu.start()
            node_cpu.start()
            runs["cold"].append(megabytes_per_second(target / FILE))
            cpu["holder"] += holder_cpu.stop()
            cpu["node"] += node_cpu.stop()
            served += bytes_served(lab.holder) - served_before

            read_all(local / FILE)   # back in the page cache (the drop above took it out)
            warm: dict[str, list[float]] = {"local warm": [], "warm": []}
            for _ in range(WARM_PASSES):
                warm["local warm"].append(megabytes_per_second(local / FILE))
                warm["warm"].append(megabytes_per_second(target / FILE))
            for name, values in warm.items():
                runs[name].append(statistics.median(values))
        finally:
            if node is not None:
                lab.stop(node)
            unmount(local)

    cold_ratios = paired_ratios(runs["cold"], runs["local cold"])
    warm_ratios = paired_ratios(runs["warm"], runs["local warm"])
    details: dict[str, Any] = {"file_bytes": size_mib * MIB, "repeats": repeats, "mb_per_s": runs,
                               "cold_ratios": cold_ratios, "warm_ratios": warm_ratios, "warm_passes": WARM_PASSES,
                               "resident_after_drop_bytes": resident, "cpu_seconds": cpu, "bytes_served": served}
    print(f"\n{section.title}: {size_mib} MiB file, {repeats} repeats, baseline and afsd back to back in each (MB/s):")
    for name, values in runs.items():
        print(f"  {name:10}  {spread(values)}")
    print(f"  cold ÷ local cold, per repeat: {spread(cold_ratios, 3)}")
    print(f"  warm ÷ local warm, per repeat: {spread(warm_ratios, 3)}")
    print("  page cache after each drop: " + ("could not tell (no fincore)" if min(resident) < 0 else
          f"{max(resident) / MIB:.1f} MiB of the {held.path.stat().st_size / MIB:.0f} MiB blob file still resident at most"))
    section.rows.append(Row("cold sequential read, fanotify, peer holds the image",
                            f"{statistics.median(runs['cold']):,.0f} MB/s",
                            f"{statistics.median(runs['local cold']):,.0f} MB/s local erofs, cache dropped",
                            statistics.median(cold_ratios), "≥ 0.9", ratio_label=ratio_label(cold_ratios),
                            details=details))
    gib = served / GIB if served else 0.0
    if gib:
        print(f"  during the cold reads: holder served {served / MIB:,.0f} MiB with {cpu['holder']:.2f} CPU s; "
              f"the node's processes used {cpu['node']:.2f} CPU s (and {cpu['node_settling']:.2f} CPU s after the mounts, "
              "before the reads)")
        section.rows.append(Row("layerstore CPU per GiB served (during the cold reads)",
                                f"{cpu['holder'] / gib:.2f} CPU s/GiB", "-", None, "reported, halved"))
        section.rows.append(Row("node CPU per GiB filled (daemon, supervisor, keeper, workers)",
                                f"{cpu['node'] / gib:.2f} CPU s/GiB", "-", None, "reported, halved"))
    section.rows.append(Row("warm read ÷ local", f"{statistics.median(runs['warm']):,.0f} MB/s",
                            f"{statistics.median(runs['local warm']):,.0f} MB/s local erofs, warm",
                            statistics.median(warm_ratios), "≥ 0.95", ratio_label=ratio_label(warm_ratios)))
    return section


def megabytes_per_second(path: Path) -> float:
    seconds, size = read_all(path)
    return size / seconds / MB


def drop_and_check(path: Path) -> int:
    """Drop the page cache (dirty pages written back first, so they can be dropped); the bytes of `path`
    still resident afterwards (fincore), -1 if that cannot be told."""
    drop_caches()
    try:
        answer = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES", str(path)],
                                capture_output=True, text=True, timeout=30)
        return int(answer.stdout.split()[0])
    except (OSError, ValueError, IndexError, subprocess.SubprocessError):
        return -1
