"""Starting a pod through containerd's CRI: afsd's lazily attached layers vs containerd's own pull.

What it measures, in one run on loopback with real daemons (registry, discovery, a peer layerstore
holding the image, Debian's containerd 1.6 with its CRI plugin): the time from PullImage until a
container prints its first line, driven as a kubelet drives it (PullImage, RunPodSandbox with host
networking, CreateContainer, StartContainer), for an image with a large layer (`--size-mib` of random
bytes) of which the container reads one small file. The pod sandbox's (pause) image shares the base
layer and is pulled by RunPodSandbox, as a kubelet's first pod on a node would.

- afsd: containerd uses `afsd snapshotter`; the node daemon (`--backend fanotify`, background fill on;
  off with `--no-prefetch`) attaches each layer from the peer. Every repeat starts with a fresh
  containerd, snapshotter and node daemon: nothing of the image is on the node. The node daemon first
  mounts an unrelated image once, so its fetch workers are running, as on a node that served before.
- baseline: containerd's own overlayfs snapshotter downloads the layers from the registry and unpacks
  them; a fresh containerd every repeat.

Ratio = afsd / baseline: below 1, the pod starts sooner with afsd. Read the output as ratios; the
absolute numbers depend on what else the machine is doing. Usage (root):
`.venv/bin/python bench/snapshotter_bench.py [--size-mib 128] [--repeats 3] [--no-prefetch] [--json PATH]`
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
import tempfile
import time
from pathlib import Path

from _common import MIB, exit_on_sigterm, machine_facts, median, print_table, require, write_json, write_random_file

from afsd.api import layerstore_pb2 as lpb
from afsd.api import layerstore_pb2_grpc as lgrpc
from afsd.lab.catalogue import busybox_rootfs
from afsd.lab.containerd import Containerd, CriClient, container_output, snapshotter_daemon, start_containerd
from afsd.lab.daemons import (
    Daemon,
    afsd_command,
    discovery_daemon,
    layerstore_daemon,
    node_daemon,
    start_all,
    stop_node_daemon,
)
from afsd.lab.layers import Entry, LayerSpec, entries_from_directory
from afsd.lab.oci_layout import ImageSpec, write_oci_layout
from afsd.lab.registry import start_registry
from afsd.lab.skopeo import push_layout
from tests.support.cluster import unmount_everything_under

POLL = 0.05


def push_images(registry: str, work: Path, size_mib: int) -> tuple[str, str, str]:
    """(app, pause, warm-up) references: busybox, then a layer with a large file and the small one the
    container reads; the pause image shares the busybox layer; the warm-up image shares nothing."""
    rootfs = work / "busybox-rootfs"
    rootfs.mkdir()
    busybox_rootfs(rootfs)
    base = LayerSpec(tuple(entries_from_directory(rootfs)))
    big = write_random_file(work / "big.bin", size_mib * MIB)
    app = LayerSpec((Entry.file("srv/hello.txt", b"hello\n"), Entry("srv/big.bin", "file", source=big)))
    layouts = work / "layouts"
    app_layout = write_oci_layout(layouts, "app", ImageSpec((base, app)))
    pause_layout = write_oci_layout(layouts, "pause", ImageSpec((base,), entrypoint=("/bin/sleep", "2147483647"),
                                                               cmd=()))
    warm_layout = write_oci_layout(layouts, "warm", ImageSpec((LayerSpec((Entry.file("warm.txt", b"warm\n"),)),)))
    return (push_layout(app_layout, registry, "bench/app", "v1").reference,
            push_layout(pause_layout, registry, "bench/pause", "v1").reference,
            push_layout(warm_layout, registry, "bench/warm", "v1").reference)


def warm_up(node: Daemon, image: str, target: Path) -> None:
    """Mount and read an unrelated image once: the node daemon's fetch workers are up and connected, as
    on a node that has served before (a fresh one spends seconds starting them on this box)."""
    target.mkdir()
    socket = ["--socket", str(node.socket_path)]
    mounted = afsd_command("mount", *socket, image, str(target))
    if mounted.returncode != 0:
        raise RuntimeError(f"afsd mount failed: {mounted.stderr.strip()}")
    try:
        (target / "warm.txt").read_bytes()
    finally:
        afsd_command("umount", *socket, str(target))


PHASES = ("PullImage", "RunPodSandbox", "Create+StartContainer", "first output")


async def start_pod(containerd: Containerd, app: str, pause: str, logs: Path) -> list[float]:
    """Seconds of each of PHASES, then remove the pod and the images (containerd's garbage collector
    then removes their snapshots, which releases afsd's layers)."""
    cri = CriClient(containerd)
    try:
        marks = [time.perf_counter()]
        await cri.pull(app)
        marks.append(time.perf_counter())
        pod = cri.pod_config("bench", logs)
        pod_id = await cri.run_pod(pod)
        marks.append(time.perf_counter())
        container_id = await cri.start_container(pod_id, pod, "app", app, ["/bin/cat", "/srv/hello.txt"])
        marks.append(time.perf_counter())
        while not container_output(pod, "app"):
            await asyncio.sleep(POLL)
        marks.append(time.perf_counter())
        await cri.remove_pod(pod_id, [container_id])
        for image in (app, pause):
            await cri.remove_image(image)
        return [end - start for start, end in zip(marks, marks[1:])]
    finally:
        await cri.close()


async def pull(layerstore: Daemon, reference: str) -> None:
    import grpc
    async with grpc.aio.insecure_channel(layerstore.address) as channel:
        await lgrpc.LayerStoreStub(channel).PullImage(lpb.PullImageRequest(image=reference), timeout=900)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mib", type=int, default=128, help="size of the large file (default %(default)s)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per measurement; medians are reported")
    parser.add_argument("--no-prefetch", action="store_true",
                        help="run the node daemon with --no-prefetch (no background fill competing for the CPU)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    require("containerd", "ctr", "containerd-shim-runc-v2", "runc", "skopeo")
    exit_on_sigterm()
    work = Path(tempfile.mkdtemp(prefix="afsd-snapshotter-bench-", dir="/var/tmp"))
    daemons: list[Daemon] = []
    registry = None
    try:
        registry = start_registry(work / "registry")
        app, pause, warm = push_images(registry.address, work, args.size_mib)
        registry_args = ["--insecure-registry", registry.address]
        discovery = discovery_daemon(work, "discovery", registry_args=registry_args)
        peer = layerstore_daemon(work, "peer", [discovery.address], heartbeat_period=1.0, registry_args=registry_args)
        daemons += [discovery, peer]
        start_all([discovery, peer])
        for reference in (app, pause, warm):
            asyncio.run(pull(peer, reference))
        time.sleep(1.5)  # the peer's heartbeat reaches discovery

        results: dict[str, list[list[float]]] = {"afsd": [], "baseline": []}
        for index in range(args.repeats):
            node = node_daemon(work, f"node{index}", [discovery.address],
                               extra_args=["--backend", "fanotify", *(["--no-prefetch"] if args.no_prefetch else [])])
            snapshotter = snapshotter_daemon(work, f"snapshotter{index}", node.socket_path)
            start_all([node])
            warm_up(node, warm, work / f"warm{index}")
            start_all([snapshotter])
            containerd = start_containerd(snapshotter_socket=snapshotter.socket_path, registry=registry.address,
                                          sandbox_image=pause)
            try:
                results["afsd"].append(asyncio.run(start_pod(containerd, app, pause, work / f"logs-afsd-{index}")))
            finally:
                containerd.stop()
                snapshotter.stop()
                stop_node_daemon(node)
            containerd = start_containerd(snapshotter_socket=work / "unused.sock", registry=registry.address,
                                          sandbox_image=pause, snapshotter="overlayfs")
            try:
                results["baseline"].append(asyncio.run(start_pod(containerd, app, pause, work / f"logs-base-{index}")))
            finally:
                containerd.stop()

        def medians(name: str) -> list[float]:
            runs = results[name]
            return [median([run[i] for run in runs]) for i in range(len(PHASES))] + [median([sum(r) for r in runs])]
        base, lazy = medians("baseline"), medians("afsd")
        rows = [[phase, f"{b:.3f}", f"{a:.3f}", f"{a / b:.2f}"]
                for phase, b, a in zip((*PHASES, "total: pull to first output"), base, lazy)]
        print(f"CRI pod start, image with a {args.size_mib} MiB layer the container does not read, medians of "
              f"{args.repeats} (baseline: containerd's overlayfs, layers from the registry; afsd: layers attached "
              f"from a peer{', --no-prefetch' if args.no_prefetch else ''})")
        print_table(["phase", "baseline s", "afsd s", "ratio"], rows)
        write_json(args.json, {"machine": machine_facts(), "size_mib": args.size_mib, "no_prefetch": args.no_prefetch,
                               "phases": PHASES, "seconds": results})
        return 0
    finally:
        for daemon in daemons:
            daemon.stop()
        if registry is not None:
            registry.stop()
        leftovers = unmount_everything_under(work)
        if leftovers:
            print(f"detached {len(leftovers)} mount(s) left under {work}", file=sys.stderr)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
