"""Mounting an image a peer holds: time to first byte per backend, and lazy read throughput.

What it measures, all in one run on loopback with real daemons (registry, discovery, layerstores,
node daemon):

1. Time to first byte of a small file in a never-seen image that a peer layerstore holds, with each
   host backend (`fanotify`, `eager`): `afsd mount` + reading the file, with a fresh node daemon state
   each time. Baseline: pulling and converting the same image from the registry on a fresh layerstore
   (what a node without peers pays before it can mount anything). Ratio = backend / baseline.
2. Cold sequential read of a large file through a `fanotify` mount (page cache dropped, nothing of the
   blob on the node), and a warm re-read, each divided by the same read from a local file-backed erofs
   mount of the complete blob (page cache dropped for the cold one). The warm ratio should be about 1:
   warm reads never leave the kernel.

Read the output as ratios; the absolute numbers depend on what else the machine is doing. Usage:
`.venv/bin/python bench/mount_bench.py [--size-mib 128] [--repeats 3] [--json PATH]` (root).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import (
    MIB,
    drop_caches,
    exit_on_sigterm,
    machine_facts,
    median,
    print_table,
    push_single_file_image,
    read_all,
    write_json,
    write_random_file,
)

from afsd.api import layerstore_pb2 as lpb
from afsd.api import layerstore_pb2_grpc as lgrpc
from afsd.erofs.mount import mount_erofs, unmount
from afsd.lab.daemons import Daemon, discovery_daemon, layerstore_daemon, node_daemon, start_all, stop_node_daemon
from afsd.lab.registry import start_registry


def afsd(*args: str) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([sys.executable, "-m", "afsd", *args], capture_output=True, text=True, timeout=900)
    if result.returncode != 0:
        raise RuntimeError(f"afsd {' '.join(args)} failed: {result.stderr.strip()}")
    return result


async def pull(daemon: Daemon, reference: str) -> lpb.PullImageResponse:
    async with grpc_channel(daemon.address) as channel:
        return await lgrpc.LayerStoreStub(channel).PullImage(lpb.PullImageRequest(image=reference), timeout=900)


def grpc_channel(address: str):
    import grpc
    return grpc.aio.insecure_channel(address)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mib", type=int, default=128, help="size of the large file (default %(default)s)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per measurement; medians are reported")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    exit_on_sigterm()
    work = Path(tempfile.mkdtemp(prefix="afsd-mount-bench-", dir="/var/tmp"))
    daemons: list[Daemon] = []
    nodes: list[Daemon] = []
    registry = None
    try:
        registry = start_registry(work / "registry")
        big = write_random_file(work / "big.bin", args.size_mib * MIB)
        reference, _ = push_single_file_image(registry.address, work, "big", big)
        registry_args = ["--insecure-registry", registry.address]
        discovery = discovery_daemon(work, "discovery", registry_args=registry_args)
        holder = layerstore_daemon(work, "holder", [discovery.address], heartbeat_period=1.0,
                                   registry_args=registry_args)
        daemons += [discovery, holder]
        start_all([discovery, holder])
        (layer,) = asyncio.run(pull(holder, reference)).layers
        time.sleep(1.5)  # the holder's heartbeat reaches discovery

        # Baseline: pull + convert from the registry on a fresh layerstore with no peers to ask.
        baseline = []
        for index in range(args.repeats):
            alone = layerstore_daemon(work, f"alone{index}", [], registry_args=registry_args)
            daemons.append(alone)
            start_all([alone])
            started = time.perf_counter()
            asyncio.run(pull(alone, reference))
            baseline.append(time.perf_counter() - started)
            alone.stop()

        ttfb: dict[str, list[float]] = {"fanotify": [], "eager": []}
        for backend in ttfb:
            for index in range(args.repeats):
                node = node_daemon(work, f"node-{backend}-{index}", [discovery.address],
                                   extra_args=["--no-prefetch"])
                nodes.append(node)
                start_all([node])
                target = work / f"mnt-{backend}-{index}"
                target.mkdir()
                drop_caches()
                started = time.perf_counter()
                afsd("mount", "--socket", str(node.socket_path), "--backend", backend, reference, str(target))
                with open(target / "data/big.bin", "rb") as handle:
                    handle.read(1)
                ttfb[backend].append(time.perf_counter() - started)
                stop_node_daemon(node)
                nodes.remove(node)

        # Lazy sequential read (fanotify, nothing read yet) vs a local mount of the complete blob.
        cold, warm, local_cold, local_warm = [], [], [], []
        for index in range(args.repeats):
            node = node_daemon(work, f"node-read-{index}", [discovery.address], extra_args=["--no-prefetch"])
            nodes.append(node)
            start_all([node])
            target = work / f"mnt-read-{index}"
            target.mkdir()
            afsd("mount", "--socket", str(node.socket_path), "--backend", "fanotify", reference, str(target))
            drop_caches()
            seconds, size = read_all(target / "data/big.bin")
            cold.append(size / seconds)
            seconds, size = read_all(target / "data/big.bin")
            warm.append(size / seconds)
            stop_node_daemon(node)
            nodes.remove(node)
            local = work / f"local-{index}"
            local.mkdir()
            mount_erofs(Path(layer.cache_path), local)
            try:
                drop_caches()
                seconds, size = read_all(local / "data/big.bin")
                local_cold.append(size / seconds)
                seconds, size = read_all(local / "data/big.bin")
                local_warm.append(size / seconds)
            finally:
                unmount(local)

        base = median(baseline)
        rows = [["pull + convert from the registry (baseline)", f"{base:.3f}", "1.00"]]
        rows += [[f"afsd mount --backend {b} + first byte (peer holds it)", f"{median(v):.3f}",
                  f"{median(v) / base:.2f}"] for b, v in ttfb.items()]
        print(f"time to first byte, {args.size_mib} MiB image, medians of {args.repeats}")
        print_table(["what", "seconds", "ratio"], rows)
        print()
        reads = [["cold sequential read", f"{median(cold) / 1e6:.0f}", f"{median(local_cold) / 1e6:.0f}",
                  f"{median(cold) / median(local_cold):.2f}"],
                 ["warm re-read", f"{median(warm) / 1e6:.0f}", f"{median(local_warm) / 1e6:.0f}",
                  f"{median(warm) / median(local_warm):.2f}"]]
        print(f"reading the {args.size_mib} MiB file: fanotify (fetched lazily from a peer) vs a local erofs mount")
        print_table(["read", "fanotify MB/s", "local MB/s", "ratio"], reads)
        write_json(args.json, {"machine": machine_facts(), "baseline_seconds": baseline, "ttfb_seconds": ttfb,
                               "cold_bytes_per_s": cold, "warm_bytes_per_s": warm,
                               "local_cold_bytes_per_s": local_cold, "local_warm_bytes_per_s": local_warm})
        return 0
    finally:
        for node in nodes:
            stop_node_daemon(node)
        for daemon in daemons:
            daemon.stop()
        if registry is not None:
            registry.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
