"""Learned prefetch across real nodes (docs/learned-prefetch.md): node B runs a task from an image only node A
holds and its node daemon records what the task read first; node C, mounting the same image, fetches that
before the task asks, so its kernel backend answers most of the task's reads without a demand fetch. And
traces are peer data: forged ones are refused or cut to the blob, and mounts work regardless."""

from __future__ import annotations

import asyncio
import json
import subprocess
from pathlib import Path
from typing import Any

import grpc
import pytest

from afsd.api import discovery_pb2 as dpb
from afsd.api import discovery_pb2_grpc as dgrpc
from afsd.lab.daemons import Daemon
from afsd.lab.debian import debian_layout
from afsd.lab.skopeo import PushedImage, push_layout
from tests.support.cluster import LocalCluster, small_image
from tests.support.hostile import ForgingDiscovery, serving
from tests.support.metrics import daemon_metrics, metric
from tests.support.treecompare import compare_trees, format_differences, snapshot
from tests.support.umoci import umoci_rootfs

TASK = ["/usr/bin/python3", "-c", "import json, sqlite3, ssl, email, asyncio; print('started')"]
NODE_ARGS = ["--no-prefetch", "--trace-window", "60"]   # only what readers touch, and what was learned


async def push_python_image(cluster: LocalCluster) -> PushedImage:
    cached = await asyncio.to_thread(debian_layout, include=("python3",))
    return await asyncio.to_thread(push_layout, cached.layout, cluster.registry.address, "test/debian-python3", "v1")


async def mounts(cluster: LocalCluster, node: Daemon) -> dict[str, Any]:
    listed = await cluster.afsd(node, "mounts", "--json")
    assert listed.returncode == 0, listed.stderr
    return json.loads(listed.stdout)


async def run_task(target: Path) -> None:
    done = await asyncio.to_thread(subprocess.run, ["chroot", str(target), *TASK], capture_output=True, text=True,
                                   timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "started", done.stderr


async def mount(cluster: LocalCluster, node: Daemon, image: str, target: Path) -> None:
    target.mkdir()
    mounted = await cluster.afsd(node, "mount", image, str(target), "--backend", "fanotify")
    assert mounted.returncode == 0, mounted.stderr


def fanotify(counters: dict[str, float]) -> dict[str, float]:
    return {key.split(".", 1)[1]: value for key, value in counters.items() if key.startswith("fanotify.")}


async def test_a_node_fetches_what_another_nodes_task_read_first_before_its_task_asks(cluster: LocalCluster) -> None:
    (discovery,) = await cluster.start_discovery(1)
    (store_a,) = await cluster.start_layerstores(1)
    image = await push_python_image(cluster)
    await cluster.pull(store_a, image)                       # only node A holds the image

    # Node B runs the task: nothing is learned yet, so every miss is a demand fetch; it records them.
    node_b = await cluster.start_node(None, extra_args=NODE_ARGS)
    await mount(cluster, node_b, image.reference, cluster.workdir / "task-b")
    await run_task(cluster.workdir / "task-b")
    listed_b = await mounts(cluster, node_b)
    (mount_b,) = listed_b["mounts"]
    assert all(int(layer.get("learned_ranges", 0)) == 0 for layer in mount_b["layers"])
    b = fanotify(listed_b["counters"])
    assert (await cluster.afsd(node_b, "umount", str(cluster.workdir / "task-b"))).returncode == 0

    blobs = [layer["blob_digest"] for layer in mount_b["layers"]]
    stub = cluster.discovery(discovery)

    async def learned() -> bool:
        answer = await stub.GetAccessTraces(dpb.GetAccessTracesRequest(blob_digests=blobs))
        return any(trace.ranges for trace in answer.traces)
    await cluster.wait_until(learned, 60, "node B's recording to reach discovery")

    # Node C mounts the same image: its backend fetches what B's task read first, before C's task asks.
    node_c = await cluster.start_node(None, extra_args=NODE_ARGS)
    await mount(cluster, node_c, image.reference, cluster.workdir / "task-c")
    before = fanotify((await mounts(cluster, node_c))["counters"])
    await run_task(cluster.workdir / "task-c")
    listed_c = await mounts(cluster, node_c)
    after = fanotify(listed_c["counters"])
    reads = after["events_total"] - before["events_total"]
    demand = after["events_filled_demand"] - before["events_filled_demand"]
    demand_bytes_b = b["bytes_filled"] - b["bytes_prefetched"]
    demand_bytes_c = (after["bytes_filled"] - after["bytes_prefetched"]) - (before["bytes_filled"] - before["bytes_prefetched"])
    print(f"node B: {b['events_total']:.0f} reads, {b['events_filled_demand']:.0f} waited for a demand fetch, "
          f"{demand_bytes_b / 2**20:.1f} MiB demand-fetched; node C: {reads:.0f} reads, {demand:.0f} waited for a "
          f"demand fetch, {demand_bytes_c / 2**20:.1f} MiB demand-fetched, learned "
          f"{after['learned_bytes_prefetched'] / 2**20:.1f} MiB fetched, {after['learned_bytes_used'] / 2**20:.1f} MiB used")
    assert b["events_filled_demand"] > 0 and demand_bytes_b > 0          # B: misses waited for the network
    assert reads > 0 and demand < 0.5 * reads and demand < b["events_filled_demand"]   # C: most reads did not
    assert demand_bytes_c < 0.5 * demand_bytes_b
    assert after["learned_blobs"] >= 1 and after["learned_bytes_used"] > 0.8 * after["learned_bytes_prefetched"]
    (mount_c,) = listed_c["mounts"]
    assert any(int(layer.get("learned_ranges", 0)) > 0 for layer in mount_c["layers"])
    table = await cluster.afsd(node_c, "mounts")
    assert "LEARNED (USED/FETCHED)" in table.stdout and "learned used" in table.stdout, table.stdout
    text = await asyncio.to_thread(daemon_metrics, node_c)
    assert metric(text, "afsd_node_learned_traces_total", result="hit") >= 1
    assert metric(text, "afsd_fanotify_learned_bytes_used_total") > 0

    # The bytes C's task saw (and every other byte of the image) are the image's, as umoci unpacks it.
    reference = await asyncio.to_thread(umoci_rootfs, image, image.platforms[0], cluster.workdir / "umoci")
    differences = compare_trees(await asyncio.to_thread(snapshot, cluster.workdir / "task-c"),
                                await asyncio.to_thread(snapshot, reference), labels=("node C", "umoci"))
    assert differences == [], format_differences(differences, ("node C", "umoci"))

    shown = await cluster.afsd(None, "trace", "show", image.reference, "--discovery-endpoint", discovery.address)
    assert shown.returncode == 0, shown.stderr
    assert "merged from 1 run(s) of this image" in shown.stdout, shown.stdout


async def test_with_no_learned_prefetch_a_node_neither_uses_nor_reports_traces(cluster: LocalCluster) -> None:
    (discovery,) = await cluster.start_discovery(1)
    (store_a,) = await cluster.start_layerstores(1)
    image = await cluster.push("unlearned", small_image("unlearned", 4 << 20))
    await cluster.pull(store_a, image)
    node = await cluster.start_node(None, extra_args=["--no-learned-prefetch", "--no-prefetch", "--trace-window", "1"])
    target = cluster.workdir / "rootfs"
    await mount(cluster, node, image.reference, target)
    assert (target / "etc/unlearned-0.txt").read_text() == "unlearned layer 0\n"
    assert (await cluster.afsd(node, "umount", str(target))).returncode == 0
    text = await asyncio.to_thread(daemon_metrics, node)
    assert metric(text, "afsd_node_learned_traces_total", result="off") == 2
    assert metric(text, "afsd_node_trace_reports_total") == 0
    blobs = [layer.blob_digest for layer in (await cluster.pull(store_a, image)).layers]
    answer = await cluster.discovery(discovery).GetAccessTraces(dpb.GetAccessTracesRequest(blob_digests=blobs))
    assert list(answer.traces) == []


# -- hostile traces ------------------------------------------------------------------------------------------


def forged(kind: str, blobs: dict[str, int]) -> dpb.GetAccessTracesResponse:
    """What a hostile discovery replica answers GetAccessTraces with (`blobs`: digest -> size of the real ones)."""
    answer = dpb.GetAccessTracesResponse()
    for digest, size in blobs.items():
        trace = answer.traces.add(blob_digest=digest, blob_size=size, runs=1)
        if kind == "another blob's digest":
            trace.blob_digest = "sha256:" + "6" * 64
        elif kind == "ranges past the blob's end":
            trace.ranges.add(offset=0, length=64 << 10)
            trace.ranges.add(offset=size - 4096, length=1 << 40)     # cut to the blob
            trace.ranges.add(offset=size + (1 << 30), length=4096)   # dropped
        elif kind == "another size":
            trace.blob_size = size + 4096
        elif kind == "100,000 ranges":
            trace.ranges.extend(dpb.TraceRange(offset=i * 8192, length=4096) for i in range(100_000))
        elif kind == "2,000,000 ranges":   # 16 MB: more than any gRPC answer may be (4 MiB)
            trace.ranges.extend(dpb.TraceRange(offset=i * 8192, length=4096) for i in range(2_000_000))
    return answer


class TraceForgingDiscovery(ForgingDiscovery):
    """Relays to a real replica, but answers GetAccessTraces with `answers[kind]` (made in advance: building
    two million ranges takes longer than a mount waits for traces)."""

    kind: str = ""
    answers: dict[str, dpb.GetAccessTracesResponse] = {}

    async def GetAccessTraces(self, request: dpb.GetAccessTracesRequest, context: grpc.aio.ServicerContext):
        return self.answers[self.kind]


KINDS = {"another blob's digest": "unavailable", "another size": "rejected", "ranges past the blob's end": "hit",
         "100,000 ranges": "unavailable", "2,000,000 ranges": "unavailable"}


async def test_forged_traces_are_refused_or_cut_to_the_blob_and_mounts_still_work(cluster: LocalCluster) -> None:
    (discovery,) = await cluster.start_discovery(1)
    (store_a,) = await cluster.start_layerstores(1)
    image = await cluster.push("forged", small_image("forged", 8 << 20, layers=1))
    (layer,) = (await cluster.pull(store_a, image)).layers
    fake = TraceForgingDiscovery(cluster.discovery(discovery))
    fake.answers = {kind: forged(kind, {layer.blob_digest: layer.afs_size}) for kind in KINDS}
    async with serving(lambda server: dgrpc.add_ServiceDiscoveryServicer_to_server(fake, server)) as address:
        node = await cluster.start_node(None, extra_args=["--no-prefetch"], discovery_endpoints=[address])
        for index, (kind, result) in enumerate(KINDS.items()):
            fake.kind = kind
            before = metric(await asyncio.to_thread(daemon_metrics, node), "afsd_node_learned_traces_total",
                            result=result)
            target = cluster.workdir / f"rootfs-{index}"
            await mount(cluster, node, image.reference, target)
            assert (target / "etc/forged-0.txt").read_text() == "forged layer 0\n", kind
            data = (target / "data/forged-0.bin").read_bytes()
            assert len(data) == 8 << 20, kind
            (listed,) = (await mounts(cluster, node))["mounts"]
            learned = int(listed["layers"][0].get("learned_ranges", 0))
            assert learned == (2 if result == "hit" else 0), kind      # past the end: cut, one range dropped
            assert (await cluster.afsd(node, "umount", str(target))).returncode == 0
            after = metric(await asyncio.to_thread(daemon_metrics, node), "afsd_node_learned_traces_total",
                           result=result)
            assert after == before + 1, kind
        log = node.log()
        assert "answered with a trace for blob 'sha256:666" in log
        assert "a trace of 100000 ranges (at most 16384)" in log
        assert "RESOURCE_EXHAUSTED" in log


@pytest.mark.parametrize("change, code", [
    ({"blob_digest": "sha256:" + "7" * 64}, grpc.StatusCode.FAILED_PRECONDITION),   # nobody advertises it
    ({"blob_size": 12345}, grpc.StatusCode.FAILED_PRECONDITION),                    # not its size
    ({"ranges": [dpb.TraceRange(offset=-1, length=4096)]}, grpc.StatusCode.INVALID_ARGUMENT),
    ({"blob_digest": "sha256:../../etc"}, grpc.StatusCode.INVALID_ARGUMENT),
])
async def test_discovery_refuses_reports_about_blobs_nobody_holds_and_malformed_ones(
        cluster: LocalCluster, change: dict[str, Any], code: grpc.StatusCode) -> None:
    (discovery,) = await cluster.start_discovery(1)
    (store_a,) = await cluster.start_layerstores(1)
    image = await cluster.push("reported", small_image("reported", 1 << 20, layers=1))
    (layer,) = (await cluster.pull(store_a, image)).layers
    stub = cluster.discovery(discovery)
    honest = dpb.ReportAccessTraceRequest(node_id="n", layer_digest=layer.digest, blob_digest=layer.blob_digest,
                                          blob_size=layer.afs_size, ranges=[dpb.TraceRange(offset=0, length=4096)])
    await cluster.wait_until(lambda: _accepted(stub, honest), 20, "discovery to take an honest report")
    forged_report = dpb.ReportAccessTraceRequest()
    forged_report.CopyFrom(honest)
    for key, value in change.items():
        if key == "ranges":
            del forged_report.ranges[:]
            forged_report.ranges.extend(value)
        else:
            setattr(forged_report, key, value)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.ReportAccessTrace(forged_report)
    assert refused.value.code() == code


async def _accepted(stub: dgrpc.ServiceDiscoveryStub, request: dpb.ReportAccessTraceRequest) -> bool:
    try:
        return (await stub.ReportAccessTrace(request)).runs == 1
    except grpc.aio.AioRpcError:
        return False   # the layerstore's heartbeat has not arrived yet
