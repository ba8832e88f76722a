"""A node daemon stopped right after a task still tells the cluster what the task read first
(afsd/node/traces.py, `LearnedTraces.close`), and its stop stays prompt when discovery does not answer."""

from __future__ import annotations

import asyncio
import signal
import time

from afsd.api import discovery_pb2 as dpb
from afsd.lab import deadlines
from afsd.lab.daemons import Daemon
from tests.support.cluster import LocalCluster, small_image

NODE_ARGS = ["--no-prefetch", "--trace-window", "600"]   # the window is still open when the node stops


async def run_task(cluster: LocalCluster, seed: str) -> tuple[Daemon, list[str]]:
    """Node B mounts an image only a layerstore holds, a task reads a file, and B is stopped at once (its
    mount stays, as mounts outlive the daemon: nothing drops the layer and reports on the way). Returns B
    and the image's blob digests."""
    (store_a,) = await cluster.start_layerstores(1)
    image = await cluster.push(seed, small_image(seed, 4 << 20, layers=1))
    blobs = [layer.blob_digest for layer in (await cluster.pull(store_a, image)).layers]
    node_b = await cluster.start_node(None, extra_args=NODE_ARGS)
    target = cluster.workdir / "task-b"
    target.mkdir()
    mounted = await cluster.afsd(node_b, "mount", image.reference, str(target), "--backend", "fanotify")
    assert mounted.returncode == 0, mounted.stderr
    assert len((target / f"data/{seed}-0.bin").read_bytes()) == 4 << 20
    return node_b, blobs


async def test_a_node_stopped_right_after_a_task_still_publishes_its_trace(cluster: LocalCluster) -> None:
    (discovery,) = await cluster.start_discovery(1)
    node_b, blobs = await run_task(cluster, "stopped")
    assert await asyncio.to_thread(node_b.stop) == 0

    stub = cluster.discovery(discovery)
    answer = await stub.GetAccessTraces(dpb.GetAccessTracesRequest(blob_digests=blobs))
    assert [trace.blob_digest for trace in answer.traces if trace.ranges] == blobs, node_b.log()
    assert "reported the first reads of layer" in node_b.log()


async def test_a_node_stops_promptly_when_discovery_does_not_answer_its_reports(cluster: LocalCluster) -> None:
    (discovery,) = await cluster.start_discovery(1)
    node_b, _ = await run_task(cluster, "frozen")
    assert discovery.process is not None
    discovery.process.send_signal(signal.SIGSTOP)   # connections are accepted, nothing is answered
    try:
        started = time.monotonic()
        code = await asyncio.to_thread(node_b.stop, deadlines.DAEMON_STOP)
        print(f"node stopped in {time.monotonic() - started:.1f} s with discovery frozen")
    finally:
        discovery.process.send_signal(signal.SIGCONT)
    assert code == 0, node_b.log()   # exited by itself: not killed after DAEMON_STOP
    assert "gave up reporting 1 recordings" in node_b.log(), node_b.log()   # the grace period bounded it
