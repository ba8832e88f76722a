"""`afsd node` + `afsd mount/umount/mounts`, run as a user would, against a real cluster on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from afsd.lab.catalogue import seeded_bytes
from afsd.lab.daemons import Daemon
from afsd.node.records import mounted_paths
from tests.support.cluster import LocalCluster, one_line, small_image
from tests.support.metrics import daemon_metrics, metric
from tests.support.overlay import overlay_is_volatile
from tests.support.treecompare import compare_trees, format_differences, snapshot
from tests.support.umoci import umoci_rootfs

BACKENDS = ["eager", "fanotify"]


def mounts_under(root: Path) -> list[str]:
    """Mount points below `root` (other tests on this machine may be mounting elsewhere)."""
    return sorted(p for p in mounted_paths() if p.startswith(str(root) + "/"))


def into_closed_pipe(node, *args: str) -> subprocess.CompletedProcess[str]:
    """`afsd ARGS` with its output going to a pipe nobody reads any more (`afsd mounts --json | head`)."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        command = [sys.executable, "-m", "afsd", *args[:1], "--socket", str(node.socket_path), *args[1:]]
        # Without PYTHONUNBUFFERED, as a user's shell runs it: the output is buffered until exit.
        environment = {name: value for name, value in os.environ.items() if name != "PYTHONUNBUFFERED"}
        return subprocess.run(command, stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=120,
                              env=environment)
    finally:
        os.close(write_end)


@pytest.mark.parametrize("backend", BACKENDS)
async def test_a_mounted_image_is_the_tree_umoci_unpacks(cluster: LocalCluster, backend: str) -> None:
    await cluster.start_discovery(1)
    (layerstore,) = await cluster.start_layerstores(1)
    node = await cluster.start_node(layerstore)
    image = await cluster.push_features()
    target = cluster.workdir / "rootfs"
    target.mkdir()

    mounted = await cluster.afsd(node, "mount", image.reference, str(target), "--backend", backend)
    assert mounted.returncode == 0, mounted.stderr
    assert f"with backend {backend}" in mounted.stdout

    reference = await asyncio.to_thread(umoci_rootfs, image, image.platforms[0], cluster.workdir / "umoci")
    differences = compare_trees(await asyncio.to_thread(snapshot, target), await asyncio.to_thread(snapshot, reference),
                                labels=("afsd mount", "umoci"))
    assert differences == [], format_differences(differences, ("afsd mount", "umoci"))

    listed = json.loads((await cluster.afsd(node, "mounts", "--json")).stdout)
    (mount,) = listed["mounts"]
    assert (mount["target"], mount["backend"], mount["image"]) == (str(target), backend, image.reference)
    assert mount["bytes_total"] > 0 and isinstance(mount["bytes_cached"], int)   # numbers, not strings
    closed = await asyncio.to_thread(into_closed_pipe, node, "mounts", "--json")
    assert (closed.returncode, closed.stderr) == (128 + signal.SIGPIPE, "")   # quietly, as any Unix tool

    unmounted = await cluster.afsd(node, "umount", str(target))
    assert unmounted.returncode == 0, unmounted.stderr
    assert mounts_under(cluster.workdir) == []
    assert json.loads((await cluster.afsd(node, "mounts", "--json")).stdout).get("mounts", []) == []


async def test_bad_mount_requests_get_one_clear_line_and_leave_nothing_mounted(cluster: LocalCluster) -> None:
    await cluster.start_discovery(1)
    (layerstore,) = await cluster.start_layerstores(1)
    node = await cluster.start_node(layerstore)
    image = await cluster.push("small", small_image("small", 1 << 20))
    target = cluster.workdir / "mnt"
    target.mkdir()

    missing = f"{cluster.registry.address}/test/nothing:here"
    assert "nothing" in one_line(await cluster.afsd(node, "mount", missing, str(target)))
    assert "invalid image reference" in one_line(await cluster.afsd(node, "mount", "Bad/Name", str(target)))
    assert "not an existing directory" in one_line(await cluster.afsd(node, "mount", image.reference,
                                                                      str(cluster.workdir / "absent")))
    (target / "file").write_text("x")
    assert "not empty" in one_line(await cluster.afsd(node, "mount", image.reference, str(target)))
    (target / "file").unlink()
    assert (await cluster.afsd(node, "mount", image.reference, str(target))).returncode == 0
    assert "in use" in one_line(await cluster.afsd(node, "mount", image.reference, str(target)))
    assert "no afsd mount" in one_line(await cluster.afsd(node, "umount", str(cluster.workdir)))
    other = cluster.workdir / "other"
    other.mkdir()
    forced = one_line(await cluster.afsd(node, "mount", "--backend", "fscache", image.reference, str(other)))
    assert "backend fscache is not available on this node" in forced and "kernel-setup.sh" in forced
    assert (await cluster.afsd(node, "umount", str(target))).returncode == 0
    assert mounts_under(cluster.workdir) == []

    stopped = await cluster.afsd(None, "mount", "--socket", str(cluster.workdir / "no.sock"), image.reference, str(target))
    assert "node daemon is not running" in one_line(stopped)


async def test_mounts_survive_the_node_daemon_and_are_adopted_by_its_successor(cluster: LocalCluster) -> None:
    await cluster.start_discovery(1)
    (layerstore,) = await cluster.start_layerstores(1)
    node = await cluster.start_node(layerstore)
    image = await cluster.push("survivor", small_image("survivor", 2 << 20))
    target = cluster.workdir / "rootfs"
    target.mkdir()
    assert (await cluster.afsd(node, "mount", image.reference, str(target), "--tmpfs-upper")).returncode == 0
    content = (target / "etc/survivor-0.txt").read_text()

    node.kill()
    assert (target / "etc/survivor-0.txt").read_text() == content  # the mount outlives the daemon
    (target / "written-while-down").write_text("kept")
    await cluster.restart(node)

    (mount,) = json.loads((await cluster.afsd(node, "mounts", "--json")).stdout)["mounts"]
    assert mount["target"] == str(target) and mount["upper"] == "tmpfs"
    assert (target / "written-while-down").read_text() == "kept"
    assert (await cluster.afsd(node, "umount", str(target))).returncode == 0
    assert mounts_under(cluster.workdir) == []


@pytest.mark.parametrize("backend", ["fanotify", "eager"])
async def test_a_mounting_node_becomes_a_provider_of_what_it_read(cluster: LocalCluster, backend: str) -> None:
    (discovery,) = await cluster.start_discovery(1)
    store_a, store_b, store_c = await cluster.start_layerstores(3)
    image = await cluster.push("spread", small_image("spread", 3 << 20))
    layers = (await cluster.pull(store_a, image)).layers
    node_b = await cluster.start_node(store_b)
    target_b = cluster.workdir / "on-b"
    target_b.mkdir()
    mounted = await cluster.afsd(node_b, "mount", image.reference, str(target_b), "--backend", backend)
    assert mounted.returncode == 0, mounted.stderr
    for path in sorted(target_b.rglob("*")):
        if path.is_file():
            path.read_bytes()

    async def b_provides_everything() -> bool:
        return all(["node1" in await cluster.nodes_for_layer(discovery, layer.digest) for layer in layers])
    await cluster.wait_until(b_provides_everything, 20, "node b to advertise the layers it assembled")

    store_a.stop()
    registry_gets = len(cluster.registry.access_log())
    node_c = await cluster.start_node(store_c)
    target_c = cluster.workdir / "on-c"
    target_c.mkdir()
    mounted = await cluster.afsd(node_c, "mount", image.reference, str(target_c), "--backend", "eager")
    assert mounted.returncode == 0, mounted.stderr
    assert (target_c / "data/spread-1.bin").read_bytes() == (target_b / "data/spread-1.bin").read_bytes()
    blob_gets = [e for e in cluster.registry.access_log()[registry_gets:] if "/blobs/" in e.uri]
    assert blob_gets == [], "node c's bytes came from node b, not from the registry"


async def test_a_fanotify_mount_fetches_only_what_is_read(cluster: LocalCluster) -> None:
    await cluster.start_discovery(1)
    (layerstore,) = await cluster.start_layerstores(1)
    node = await cluster.start_node(layerstore, extra_args=["--no-prefetch"])
    image = await cluster.push("large", small_image("large", 96 << 20, layers=2))
    target = cluster.workdir / "rootfs"
    target.mkdir()
    mounted = await cluster.afsd(node, "mount", image.reference, str(target), "--backend", "fanotify")
    assert mounted.returncode == 0, mounted.stderr

    assert (target / "etc/large-1.txt").read_text() == "large layer 1\n"
    (mount,) = json.loads((await cluster.afsd(node, "mounts", "--json")).stdout)["mounts"]
    cached, total = int(mount["bytes_cached"]), int(mount["bytes_total"])
    assert total > 96 << 20
    assert cached < total * 0.05, f"reading one small file brought {cached} of {total} bytes"
    # The node's /metrics says the same: bytes filled (from its own layerstore) are a small fraction.
    await cluster.wait_until(lambda: _metric(node, "afsd_fanotify_bytes_filled_local_total"), 15,
                             "the node's /metrics to report the fanotify fills")
    filled = await _metric(node, "afsd_fanotify_bytes_filled_local_total")
    assert 0 < filled < total * 0.05, filled
    assert await _metric(node, "afsd_node_mounts", backend="fanotify") == 1

    expected = (await asyncio.to_thread(umoci_rootfs, image, image.platforms[0], cluster.workdir / "umoci"))
    assert (target / "data/large-0.bin").read_bytes() == (expected / "data/large-0.bin").read_bytes()
    (mount,) = json.loads((await cluster.afsd(node, "mounts", "--json")).stdout)["mounts"]
    assert int(mount["bytes_cached"]) > (48 << 20)  # that file's layer is now (nearly) all here


async def test_the_nodes_metrics_count_the_fetches_of_its_fetch_workers(cluster: LocalCluster) -> None:
    """afsd_fetch_* on the node's /metrics is every fetch the node made, in any process: its own (the
    metadata prefill) and its fanotify fetch workers' (the fills), which run in processes nobody scrapes;
    afsd_fanotify_bytes_filled_* is every byte the workers wrote into the blobs, fills cancelled because
    their blob became whole as their last bytes landed included (they send no FillDone)."""
    await cluster.start_discovery(1)
    (layerstore,) = await cluster.start_layerstores(1)
    node = await cluster.start_node(layerstore, extra_args=["--no-prefetch"])
    image = await cluster.push("counted", small_image("counted", 24 << 20))
    target = cluster.workdir / "rootfs"
    target.mkdir()
    mounted = await cluster.afsd(node, "mount", image.reference, str(target), "--backend", "fanotify")
    assert mounted.returncode == 0, mounted.stderr
    prefilled = await _bytes_cached(cluster, node)   # the metadata, written by the node before the mount
    for path in sorted(target.rglob("*.bin")):
        path.read_bytes()
    # The 24 MiB read can only have come through the fetch workers (the node's own fetch is the metadata
    # prefill, a few KiB). The counters arrive in snapshots (heartbeats), and fills ahead of the reader may
    # still be landing when it is done: wait until the counter and the blob's cached bytes agree.
    filled = 0
    async def the_workers_writes_counted() -> bool:
        nonlocal filled
        filled = await _bytes_cached(cluster, node) - prefilled
        return await _metric(node, "afsd_fanotify_bytes_filled_local_total") == filled   # not one byte more
    await cluster.wait_until(the_workers_writes_counted, 30, "afsd_fanotify_bytes_filled_local_total to equal "
                             "the bytes written into the blob since the mount")
    assert filled >= 24 << 20
    text = await asyncio.to_thread(daemon_metrics, node)
    assert metric(text, "afsd_fanotify_bytes_filled_total") == metric(text, "afsd_fanotify_bytes_filled_local_total")
    assert metric(text, "afsd_fanotify_bytes_filled_peer_total") == metric(text, "afsd_fanotify_bytes_filled_other_total") == 0
    assert filled <= metric(text, "afsd_fetch_bytes_total", source="local")
    assert metric(text, "afsd_fetch_seconds_count", priority="demand") > 1   # the prefill's and the workers'
    assert metric(text, "afsd_fetch_errors_total") == 0


async def _bytes_cached(cluster: LocalCluster, node: Daemon) -> int:
    (mount,) = json.loads((await cluster.afsd(node, "mounts", "--json")).stdout)["mounts"]
    return int(mount["bytes_cached"])


@pytest.mark.parametrize("failure", ["blob file deleted", "provider killed"])
async def test_a_long_read_survives_losing_the_serving_provider(cluster: LocalCluster, failure: str) -> None:
    (discovery,) = await cluster.start_discovery(1)
    first, second = await cluster.start_layerstores(2)
    image = await cluster.push("long", small_image("long", 48 << 20, layers=1))
    (layer,) = (await cluster.pull(first, image)).layers
    await cluster.pull(second, image)
    await cluster.wait_until(lambda: _held_by(cluster, discovery, layer.digest, {"node0", "node1"}), 20,
                             "both layerstores to advertise the layer")
    node = await cluster.start_node(None, extra_args=["--no-prefetch"])
    target = cluster.workdir / "rootfs"
    target.mkdir()
    assert (await cluster.afsd(node, "mount", image.reference, str(target), "--backend", "fanotify")).returncode == 0

    expected = (await asyncio.to_thread(umoci_rootfs, image, image.platforms[0], cluster.workdir / "umoci")
                / "data/long-0.bin").read_bytes()
    read, step, lost = bytearray(), 1 << 20, False
    with open(target / "data/long-0.bin", "rb") as handle:
        while chunk := await asyncio.to_thread(handle.read, step):
            read += chunk
            if not lost and len(read) >= len(expected) // 3:
                serving = await _serving(cluster, (first, second))
                if failure == "blob file deleted":
                    Path(next(l.cache_path for l in (await cluster.pull(serving, image)).layers)).unlink()
                else:
                    serving.kill()
                lost = True
    assert bytes(read) == expected


async def _held_by(cluster: LocalCluster, discovery, digest: str, names: set[str]) -> bool:
    return await cluster.nodes_for_layer(discovery, digest) == names


async def _serving(cluster: LocalCluster, layerstores):
    """The layerstore that has served the most blob bytes so far, by ReadLayer or byte stream (its /metrics)."""
    served = [(await _metric(daemon, "afsd_layerstore_bytes_served_total")
               + await _metric(daemon, "afsd_layerstore_stream_bytes_served_total"), daemon) for daemon in layerstores]
    return max(served, key=lambda item: item[0])[1]


async def test_afsd_mounts_reports_fanotify_worker_restarts_and_redispatched_events(cluster: LocalCluster) -> None:
    """Hung fetch workers (SIGSTOP) under a real mount: the supervisor replaces them, the reader's event
    is re-dispatched and answered with the right bytes, and `afsd mounts` says so."""
    await cluster.start_discovery(1)
    (layerstore,) = await cluster.start_layerstores(1)
    node = await cluster.start_node(layerstore, extra_args=["--no-prefetch"])
    image = await cluster.push("hung", small_image("hung", 4 << 20, layers=1))
    target = cluster.workdir / "rootfs"
    target.mkdir()
    mounted = await cluster.afsd(node, "mount", image.reference, str(target), "--backend", "fanotify")
    assert mounted.returncode == 0, mounted.stderr
    state = Path(node.args[node.args.index("--state-dir") + 1]) / "fanotify"
    found = await asyncio.to_thread(subprocess.run, ["pgrep", "-f", f"fanotify.worker --socket {state}/supervisor.sock"],
                                    capture_output=True, text=True, check=True)
    hung = [int(pid) for pid in found.stdout.split()]
    assert hung
    try:
        for pid in hung:
            os.kill(pid, signal.SIGSTOP)
        data = await asyncio.to_thread((target / "data/hung-0.bin").read_bytes)
        assert data == seeded_bytes("hung0", 4 << 20)
    finally:
        for pid in hung:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    counters = json.loads((await cluster.afsd(node, "mounts", "--json")).stdout)["counters"]
    assert counters["fanotify.worker_restarts"] >= 1 and counters["fanotify.events_redispatched"] >= 1, counters
    listed = (await cluster.afsd(node, "mounts")).stdout
    assert "worker restarts" in listed and "re-dispatched" in listed, listed
    await cluster.wait_until(lambda: _metric(node, "afsd_fanotify_worker_restarts_total"), 15,
                             "the node's /metrics to count the worker restart")


async def test_fetch_workers_load_the_cluster_sources_before_the_first_miss(cluster: LocalCluster) -> None:
    """A node's fetch workers import the gRPC stack as they start (the first reader to miss does not wait
    for it): with no mount made yet, every worker has gRPC's extension loaded."""
    await cluster.start_discovery(1)
    node = await cluster.start_node(extra_args=["--no-prefetch"])
    state = Path(node.args[node.args.index("--state-dir") + 1]) / "fanotify"

    async def loaded() -> bool:
        found = await asyncio.to_thread(subprocess.run, ["pgrep", "-f", f"fanotify.worker --socket {state}/supervisor.sock"],
                                        capture_output=True, text=True)
        pids = [int(pid) for pid in found.stdout.split()]
        return bool(pids) and all("cygrpc" in _maps(pid) for pid in pids)

    await cluster.wait_until(loaded, 60, "every fetch worker of the node to have loaded gRPC")


def _maps(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/maps").read_text()
    except OSError:   # a worker that just went away (it is replaced)
        return ""


async def test_a_writable_upper_dir_and_an_extra_dir_stack_above_the_image(cluster: LocalCluster) -> None:
    await cluster.start_discovery(1)
    (layerstore,) = await cluster.start_layerstores(1)
    node = await cluster.start_node(layerstore)
    image = await cluster.push("stack", small_image("stack", 1 << 20))
    extra, upper, target = (cluster.workdir / name for name in ("extra", "writable", "rootfs"))
    (extra / "etc").mkdir(parents=True)
    upper.mkdir()                                                        # must exist: the mount does not invent it
    (extra / "etc/stack-1.txt").write_text("from the extra dir\n")      # shadows the image's file
    (extra / "etc/only-extra.txt").write_text("extra\n")
    target.mkdir()
    mounted = await cluster.afsd(node, "mount", image.reference, str(target),   # --backend auto, the default
                                 "--upper", str(upper), "--extra-dir", str(extra))
    assert mounted.returncode == 0, mounted.stderr
    assert "with backend fanotify" in mounted.stdout     # the best this kernel supports, and it says so
    assert not overlay_is_volatile(target)               # an upper the caller keeps is synced as usual
    assert (target / "etc/stack-0.txt").read_text() == "stack layer 0\n"
    assert (target / "etc/stack-1.txt").read_text() == "from the extra dir\n"
    assert (target / "etc/only-extra.txt").read_text() == "extra\n"
    (target / "etc/new.txt").write_text("written in the container\n")
    (target / "etc/stack-0.txt").unlink()
    assert not (extra / "etc/new.txt").exists()                             # the extra dir stays read-only
    assert (await cluster.afsd(node, "umount", str(target))).returncode == 0
    assert not os.path.ismount(target) and list(target.iterdir()) == []
    assert (upper / "upper/etc/new.txt").read_text() == "written in the container\n"   # kept after umount
    whiteout = os.lstat(upper / "upper/etc/stack-0.txt")
    assert stat.S_ISCHR(whiteout.st_mode) and whiteout.st_rdev == 0           # deletion recorded as a whiteout


async def test_a_volatile_upper_is_never_synced_and_still_keeps_what_was_written(cluster: LocalCluster) -> None:
    """--volatile-upper (what afslet asks for its tasks' scratch): overlayfs `volatile`, so unmounting does
    not sync the node's disk; the upper still holds the writes afterwards (they need not survive a crash),
    and the image mounts again with a fresh upper."""
    await cluster.start_discovery(1)
    (layerstore,) = await cluster.start_layerstores(1)
    node = await cluster.start_node(layerstore)
    image = await cluster.push("volatile", small_image("volatile", 1 << 20))
    (cluster.workdir / "read-only").mkdir()
    refused = one_line(await cluster.afsd(node, "mount", image.reference, str(cluster.workdir / "read-only"),
                                          "--volatile-upper"))
    assert "--volatile-upper is about a writable upper" in refused
    for run in range(2):
        upper, target = cluster.workdir / f"scratch-{run}", cluster.workdir / f"rootfs-{run}"
        upper.mkdir()
        target.mkdir()
        mounted = await cluster.afsd(node, "mount", image.reference, str(target), "--upper", str(upper),
                                     "--volatile-upper")
        assert mounted.returncode == 0, mounted.stderr
        assert overlay_is_volatile(target)
        with open(target / "etc/new.txt", "w") as written:
            written.write(f"run {run}\n")
            written.flush()
            os.fsync(written.fileno())     # skipped by the kernel, not refused
        assert (await cluster.afsd(node, "umount", str(target))).returncode == 0
        assert not os.path.ismount(target) and list(target.iterdir()) == []
        assert (upper / "upper/etc/new.txt").read_text() == f"run {run}\n"
        assert (upper / "work" / "work" / "incompat" / "volatile").is_dir()   # the kernel marks it: not reusable


async def _metric(daemon, name: str, **labels: str) -> float:
    return metric(await asyncio.to_thread(daemon_metrics, daemon), name, **labels)


async def test_a_lingering_layer_keeps_filling_and_spreads_after_a_short_task(cluster: LocalCluster) -> None:
    """With --layer-linger, a task that reads one file and unmounts at once still leaves its node a
    provider: the layers stay attached a while, their background fill completes, the local layerstore
    adopts them; then they are released and nothing stays mounted."""
    (discovery,) = await cluster.start_discovery(1)
    store_a, store_b = await cluster.start_layerstores(2)
    image = await cluster.push("linger", small_image("linger", 4 << 20))
    layers = (await cluster.pull(store_a, image)).layers
    node = await cluster.start_node(store_b, extra_args=["--layer-linger", "5"])
    state = node.args[node.args.index("--state-dir") + 1]
    target = cluster.workdir / "task"
    target.mkdir()
    mounted = await cluster.afsd(node, "mount", image.reference, str(target), "--backend", "fanotify")
    assert mounted.returncode == 0, mounted.stderr
    assert (target / "etc/linger-0.txt").read_text() == "linger layer 0\n"
    assert (await cluster.afsd(node, "umount", str(target))).returncode == 0
    assert not os.path.ismount(target)

    def node_mounts() -> list[str]:
        return [point for point in mounted_paths() if point.startswith(state + "/")]
    assert node_mounts(), "the layers linger after the image is unmounted"

    async def b_provides_everything() -> bool:
        return all(["node1" in await cluster.nodes_for_layer(discovery, layer.digest) for layer in layers])
    await cluster.wait_until(b_provides_everything, 20, "the lingering layers to complete and spread")
    await cluster.wait_until(lambda: not node_mounts(), 20, "the lingering layers to be released")
    # A node daemon stopped (SIGTERM) while layers linger releases them: they have no mount to outlive.
    assert (await cluster.afsd(node, "mount", image.reference, str(target))).returncode == 0
    assert (await cluster.afsd(node, "umount", str(target))).returncode == 0
    assert node_mounts()
    await asyncio.to_thread(node.stop)
    assert not node_mounts()
