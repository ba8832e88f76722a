"""Discovery at scale: N simulated layerstores (heartbeat clients, afsd/sim/heartbeats.py) of 100 layers
each heartbeat a real `afsd discovery` process; then, while they keep heartbeating at the usual period,
clients ask who holds layers and images. Measured per N: discovery CPU per heartbeat, latency p50/p99
and answer size of each query, and what the reference's whole-record answer would weigh (the "before").

Usage: `.venv/bin/python -m bench.discovery_bench [--nodes 1000 ...] [--queries 200] [--json PATH]`.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc
from bench._common import machine_facts, percentile, write_json

from afsd.api import discovery_pb2 as pb
from afsd.api import discovery_pb2_grpc as pb_grpc
from afsd.lab.daemons import discovery_daemon, start_all
from afsd.sim.heartbeats import BASE_LAYERS, fake_layerstores, heartbeat_all, image_key, layer_digest

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
HEARTBEAT_PERIOD = 10.0   # the layerstore's default
BIG = 256 << 20           # this client accepts the old whole-record answers, to weigh them


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


async def _timed(call, count: int, concurrency: int = 4) -> tuple[list[float], list[int]]:
    slots = asyncio.Semaphore(concurrency)
    latencies: list[float] = []
    sizes: list[int] = []

    async def one(i: int) -> None:
        async with slots:
            started = time.perf_counter()
            answer = await call(i)
            latencies.append(time.perf_counter() - started)
            sizes.append(answer.ByteSize())
    await asyncio.gather(*(one(i) for i in range(count)))
    return latencies, sizes


async def measure(nodes: int, layers: int, queries: int, workdir: Path) -> dict[str, Any]:
    daemon = discovery_daemon(workdir, f"discovery-{nodes}", ttl=3600, metrics=False)
    await asyncio.to_thread(start_all, [daemon])
    assert daemon.process is not None
    channel = grpc.aio.insecure_channel(daemon.address, options=[("grpc.max_receive_message_length", BIG)])
    stub = pb_grpc.ServiceDiscoveryStub(channel)
    fleet = fake_layerstores(nodes, layers)
    result: dict[str, Any] = {"nodes": nodes, "layers_per_node": layers}
    try:
        await heartbeat_all(channel, fleet)  # the first round creates every record
        cpu_before, rounds = cpu_seconds(daemon.process.pid), 3
        beats: list[float] = []
        for _ in range(rounds):
            beats += await heartbeat_all(channel, fleet)
        cpu = cpu_seconds(daemon.process.pid) - cpu_before
        result["heartbeat"] = {"cpu_ms_per_heartbeat": 1000 * cpu / (rounds * nodes),
                               "p50_ms": 1000 * percentile(beats, 0.5), "p99_ms": 1000 * percentile(beats, 0.99),
                               "request_bytes": fleet[0].heartbeat().ByteSize()}
        keep_beating = asyncio.create_task(_steady_heartbeats(channel, fleet))
        rng = random.Random(1)
        popular, endpoints = layer_digest(0), [node.endpoint for node in fleet]
        held = sorted({i for node in fleet for i in node.layers})
        images = sorted({i for node in fleet for i in node.images})
        kinds = {
            "FindProvider(popular layer)": lambda i: stub.FindProvider(pb.FindProviderRequest(layer_digest=popular)),
            "FindProvider(any layer)": lambda i: stub.FindProvider(
                pb.FindProviderRequest(layer_digest=layer_digest(rng.choice(held)))),
            "FindProvider(layer, 16, requester)": lambda i: stub.FindProvider(pb.FindProviderRequest(
                layer_digest=popular, max_services=16, requester_endpoint=rng.choice(endpoints))),
            "FindImageProvider(image)": lambda i: stub.FindImageProvider(
                pb.FindImageProviderRequest(image_key=image_key(rng.choice(images)))),
            "FindImage(image)": lambda i: stub.FindImage(pb.FindImageRequest(image_key=image_key(rng.choice(images)))),
            "FindProvider(\"\") first page": lambda i: stub.FindProvider(pb.FindProviderRequest()),
            "FindProvider(\"\") endpoints": lambda i: stub.FindProvider(
                pb.FindProviderRequest(view=pb.SERVICE_VIEW_ENDPOINTS)),
        }
        result["queries"] = {}
        for name, call in kinds.items():
            latencies, sizes = await _timed(call, queries)
            result["queries"][name] = {"p50_ms": 1000 * percentile(latencies, 0.5),
                                       "p99_ms": 1000 * percentile(latencies, 0.99),
                                       "answer_bytes": int(percentile(sizes, 0.5)), "count": len(latencies)}
        # The reference's answer to FindProvider(layer) (and to "" with every node): every holder's whole
        # record in one message. Weighed here as the sum of the pages that now carry it.
        whole, token = 0, ""
        while True:
            answer = await stub.FindProvider(pb.FindProviderRequest(
                layer_digest=popular, view=pb.SERVICE_VIEW_FULL, max_services=nodes, page_token=token))
            whole += answer.ByteSize()
            token = answer.next_page_token
            if not token:
                break
        result["before"] = {"answer_bytes": whole, "over_4_mib": whole > 4 << 20}
        keep_beating.cancel()
        result["base_layers_everywhere"] = BASE_LAYERS
    finally:
        await channel.close()
        await asyncio.to_thread(daemon.stop)
    return result


async def _steady_heartbeats(channel: grpc.aio.Channel, fleet: list) -> None:
    """Every node heartbeats once per HEARTBEAT_PERIOD, spread evenly, as long as the queries run."""
    stub = pb_grpc.ServiceDiscoveryStub(channel)
    gap = HEARTBEAT_PERIOD / len(fleet)
    requests = [node.heartbeat() for node in fleet]
    while True:
        for request in requests:
            asyncio.ensure_future(stub.Heartbeat(request, timeout=30))
            await asyncio.sleep(gap)


def run(sizes: list[int], layers: int = 100, queries: int = 200) -> list[dict[str, Any]]:
    with tempfile.TemporaryDirectory(prefix="afsd-discovery-bench-") as workdir:
        return [asyncio.run(measure(n, layers, queries, Path(workdir))) for n in sizes]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, action="append", help="simulated layerstores (repeatable; "
                                                                    "default 10, 100, 300, 1000)")
    parser.add_argument("--layers", type=int, default=100)
    parser.add_argument("--queries", type=int, default=200, help="of each kind")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    results = run(args.nodes or [10, 100, 300, 1000], args.layers, args.queries)
    for result in results:
        print(f"N={result['nodes']}: heartbeat {result['heartbeat']}")
        for name, numbers in result["queries"].items():
            print(f"   {name:<36} p50 {numbers['p50_ms']:7.2f} ms  p99 {numbers['p99_ms']:7.2f} ms  "
                  f"{numbers['answer_bytes']:>9} B")
        print(f"   before: {result['before']}")
    write_json(args.json, {"machine": machine_facts(), "discovery": results})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
