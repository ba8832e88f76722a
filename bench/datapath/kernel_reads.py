"""Rows 2, 7 and 8: a sequential read through a fanotify mount whose image only a peer holds, cold and
warm, against a local erofs mount of the complete blob; and the CPU it cost, per GiB.

Each repeat starts a fresh `afsd node` (nothing of the image on it, no background prefetch, no learned
prefetch: an earlier repeat's trace would fill the file before it is read), mounts the image with the
fanotify backend, waits until the node's processes are idle (what they still do for the mount is printed,
not counted as a cost of the read), drops the page cache and reads the large file start
to end in 4 MiB reads (cold), then again (warm). Meanwhile it counts the CPU seconds of the holder layerstore and of every process of
the node (the daemon, the fanotify supervisor and keeper, the fetch workers: each names the node's state
directory on its command line) and the bytes the holder served. Baseline, same run: the holder's blob
file mounted file-backed on this machine, read cold (page cache dropped) and warm.
"""

from __future__ import annotations

import statistics
from typing import Any

from afsd.erofs.mount import mount_erofs, unmount
from bench._common import MB, MIB, drop_caches, read_all, write_random_file
from bench.datapath._lab import (BenchLab, CpuMeter, bytes_served, daemon_pid, node_state_dir,
                                 pids_whose_command_line_has, wait_idle)
from bench.datapath._report import Row, Section

GIB = 1 << 30
FILE = "data/big.bin"


def measure(lab: BenchLab, size_mib: int, repeats: int) -> Section:
    section = Section("cold sequential read through fanotify")
    content = write_random_file(lab.work / "sequential.bin", size_mib * MIB)
    reference = lab.push("sequential", {FILE: content})
    content.unlink()
    (held,) = lab.hold(reference)

    runs: dict[str, list[float]] = {"cold": [], "warm": [], "local cold": [], "local warm": []}
    cpu: dict[str, float] = {"holder": 0.0, "node": 0.0, "node_settling": 0.0}
    served = 0.0
    for index in range(repeats):
        node = lab.node("seq", extra_args=["--no-learned-prefetch"])
        target = lab.work / f"seq-mnt-{index}"
        try:
            lab.mount(node, reference, target)
            holder_cpu = CpuMeter(lambda: [daemon_pid(lab.holder)])
            state = node_state_dir(node)
            cpu["node_settling"] += wait_idle(lambda: pids_whose_command_line_has(state))
            node_cpu = CpuMeter(lambda: pids_whose_command_line_has(state))
            drop_caches()
            served_before = bytes_served(lab.holder)
            holder_cpu.start()
            node_cpu.start()
            seconds, size = read_all(target / FILE)
            cpu["holder"] += holder_cpu.stop()
            cpu["node"] += node_cpu.stop()
            served += bytes_served(lab.holder) - served_before
            runs["cold"].append(size / seconds / MB)
            seconds, size = read_all(target / FILE)
            runs["warm"].append(size / seconds / MB)
        finally:
            lab.stop(node)
        local = lab.work / f"seq-local-{index}"
        local.mkdir()
        mount_erofs(held.path, local)
        try:
            drop_caches()
            seconds, size = read_all(local / FILE)
            runs["local cold"].append(size / seconds / MB)
            seconds, size = read_all(local / FILE)
            runs["local warm"].append(size / seconds / MB)
        finally:
            unmount(local)

    median = {name: statistics.median(values) for name, values in runs.items()}
    details: dict[str, Any] = {"file_bytes": size_mib * MIB, "repeats": repeats, "mb_per_s": runs,
                               "cpu_seconds": cpu, "bytes_served": served}
    print(f"\n{section.title}: {size_mib} MiB file, medians of {repeats} (MB/s): "
          + ", ".join(f"{name} {value:,.0f}" for name, value in median.items()))
    section.rows.append(Row("cold sequential read, fanotify, peer holds the image", f"{median['cold']:,.0f} MB/s",
                            f"{median['local cold']:,.0f} MB/s local erofs, cache dropped",
                            median["cold"] / median["local cold"], "≥ 0.9", details=details))
    gib = served / GIB if served else 0.0
    if gib:
        print(f"  during the cold reads: holder served {served / MIB:,.0f} MiB with {cpu['holder']:.2f} CPU s; "
              f"the node's processes used {cpu['node']:.2f} CPU s (and {cpu['node_settling']:.2f} CPU s after the mounts, "
              "before the reads)")
        section.rows.append(Row("layerstore CPU per GiB served (during the cold reads)",
                                f"{cpu['holder'] / gib:.2f} CPU s/GiB", "-", None, "reported, halved"))
        section.rows.append(Row("node CPU per GiB filled (daemon, supervisor, keeper, workers)",
                                f"{cpu['node'] / gib:.2f} CPU s/GiB", "-", None, "reported, halved"))
    section.rows.append(Row("warm read ÷ local", f"{median['warm']:,.0f} MB/s",
                            f"{median['local warm']:,.0f} MB/s local erofs, warm",
                            median["warm"] / median["local warm"], "≥ 0.95"))
    return section
