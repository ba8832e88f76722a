"""Benchmark of ReadLayer: how fast a layerstore serves a cached erofs blob by byte range, against `cat`.

What it measures: a real `afsd layerstore` daemon serves one erofs blob of about `--blob-mib` MiB
(default 256; an image whose single uncompressed layer holds one file of random bytes, pushed to a
local docker-registry and pulled with PullImage). A client in a separate process reads the whole
blob sequentially with afsd's own peer client (`afsd.cluster.peers.LayerStorePeer.read_stream`):
- `1 MiB ranges` and `4 MiB ranges`: one ReadLayer call per range, as a lazy reader would (a 4 MiB
  range arrives as two messages: the server caps a message at 4 MiB - 64 KiB);
- `whole blob`: one ReadLayer call streaming the whole blob.
It does so (a) over loopback, and (b) between two network namespaces joined by a veth pair
(10.231.0.1 serves, 10.231.0.2 reads; MTU 1500): the daemon is restarted inside the first namespace
with the same cache directory, the client runs under `ip netns exec` in the second.

Baseline, same run: `cat BLOB > /dev/null` with a warm page cache, i.e. what reading the same bytes
locally costs. `ratio` = ReadLayer throughput / cat throughput (1.0 would be as fast as cat).
`client CPU` is the client process's CPU time / wall time (100% = one core busy). Every number is
the median of `--repeats` runs (modes interleaved); MB/s is 10^6 bytes per second. Before timing, the
client reads the blob once and checks its sha256 against the blob digest PullImage reported.

With `--tls`, the cost of mutual TLS, same run: the blob is pulled by a layerstore running with a node
certificate of a throwaway cluster CA, and a second layerstore serves the same cache in plaintext; the
client reads from both, interleaved, and the table adds `TLS ÷ plaintext` per mode (loopback).

Run as root (network namespaces): `.venv/bin/python bench/readlayer_bench.py [--repeats 7] [--tls]
[--json out.json]`. Everything it creates (registry, daemon, namespaces, temp dir) is removed at exit.
The machine has 2 cores shared by client and server, and other work may be running: compare
ratios, not absolute numbers.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import (MB, MIB, exit_on_sigterm, machine_facts, median, print_table, push_single_file_image,
                     require, run_quiet, write_json, write_random_file)

SERVER_ADDRESS = "10.231.0.1"
CLIENT_ADDRESS = "10.231.0.2"
SERVER_PORT = 50551
MODES = (("1 MiB ranges", MIB), ("4 MiB ranges", 4 * MIB), ("whole blob", 0))  # 0: the whole blob


# ----------------------------------------------------------------------------------------------
# client (runs as a subprocess, possibly inside a network namespace)
# ----------------------------------------------------------------------------------------------


async def _read_blob(peer: Any, digest: str, size: int, range_size: int) -> int:
    step = range_size or size
    total = 0
    for offset in range(0, size, step):
        async for _, data in peer.read_stream(digest, offset, min(step, size - offset)):
            total += len(data)
    return total


async def _client(servers: list[tuple[str, str | None]], digest: str, size: int, blob_digest: str,
                  repeats: int) -> dict[str, dict[str, Any]]:
    """Read from every (address, TLS dir or None) server, interleaved: results by address, then mode."""
    from afsd.cluster.peers import LayerStorePeer
    from afsd.rpc import ChannelPool
    from afsd.trust.tls import TlsConfig

    pools = [ChannelPool(TlsConfig.from_dir(Path(tls)) if tls else None) for _, tls in servers]
    try:
        peers = []
        for (address, _), channels in zip(servers, pools):
            await asyncio.wait_for(channels.get(address).channel_ready(), timeout=60)
            peer = LayerStorePeer(address, channels)
            whole = hashlib.sha256()
            async for _, data in peer.read_stream(digest, 0, size):
                whole.update(data)
            if "sha256:" + whole.hexdigest() != blob_digest:
                raise SystemExit(f"blob read from {address} does not match {blob_digest}")
            peers.append(peer)
        runs: dict[str, dict[str, list[dict[str, float]]]] = {
            address: {name: [] for name, _ in MODES} for address, _ in servers}
        for repeat in range(repeats):
            for name, range_size in MODES[repeat % len(MODES):] + MODES[:repeat % len(MODES)]:
                for peer in peers:
                    wall, cpu = time.perf_counter(), time.process_time()
                    got = await _read_blob(peer, digest, size, range_size)
                    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
                    if got != size:
                        raise SystemExit(f"read {got} bytes of {size} ({name})")
                    runs[peer.endpoint][name].append({"seconds": wall, "client_cpu_s": cpu})
        return runs
    finally:
        for channels in pools:
            await channels.close()


def client_main(args: argparse.Namespace) -> int:
    servers = [(address, None) for address in args.client] + [(address, args.tls_dir) for address in args.tls_client]
    runs = asyncio.run(_client(servers, args.digest, args.size, args.blob_digest, args.repeats))
    json.dump(runs, sys.stdout)
    return 0


def run_client(prefix: list[str], address: str, layer: dict[str, Any], repeats: int,
               tls: tuple[str, Path] | None = None) -> dict[str, Any]:
    """Runs of the client process against `address` (and, with `tls`, (address, TLS dir) too), by address."""
    argv = [*prefix, sys.executable, str(Path(__file__).resolve()), "--client", address,
            "--digest", layer["digest"], "--size", str(layer["size"]), "--blob-digest", layer["blob_digest"],
            "--repeats", str(repeats)]
    if tls is not None:
        argv += ["--tls-client", tls[0], "--tls-dir", str(tls[1])]
    result = subprocess.run(argv, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=1200)
    if result.returncode != 0:
        raise RuntimeError(f"client at {address} failed ({result.returncode}): {result.stderr.strip()[-2000:]}")
    return json.loads(result.stdout)


# ----------------------------------------------------------------------------------------------
# setup: registry, image, daemon, namespaces
# ----------------------------------------------------------------------------------------------


async def _pull(address: str, reference: str, tls_dir: Path | None = None) -> dict[str, Any]:
    from afsd.api import layerstore_pb2 as pb
    from afsd.api import layerstore_pb2_grpc as pb_grpc
    from afsd.rpc import open_channel
    from afsd.trust.tls import TlsConfig

    async with open_channel(address, TlsConfig.from_dir(tls_dir) if tls_dir else None) as channel:
        response = await pb_grpc.LayerStoreStub(channel).PullImage(pb.PullImageRequest(image=reference), timeout=300)
    layer = response.layers[0]
    return {"digest": layer.digest, "size": layer.afs_size, "blob_digest": layer.blob_digest,
            "cache_path": layer.cache_path}


class Namespaces:
    """Two network namespaces joined by a veth pair; `remove()` deletes both (and so the pair)."""

    def __init__(self) -> None:
        tag = f"{os.getpid() % 100000}"
        self.server, self.client = f"afsdbench-s{tag}", f"afsdbench-c{tag}"
        self._created: list[str] = []

    def create(self) -> None:
        for ns in (self.server, self.client):
            run_quiet(["ip", "netns", "add", ns])
            self._created.append(ns)
        server_if, client_if = f"afsb{os.getpid() % 100000}s", f"afsb{os.getpid() % 100000}c"
        run_quiet(["ip", "link", "add", server_if, "netns", self.server, "type", "veth",
                   "peer", "name", client_if, "netns", self.client])
        for ns, interface, address in ((self.server, server_if, SERVER_ADDRESS),
                                       (self.client, client_if, CLIENT_ADDRESS)):
            run_quiet(["ip", "-n", ns, "addr", "add", f"{address}/24", "dev", interface])
            run_quiet(["ip", "-n", ns, "link", "set", interface, "up"])
            run_quiet(["ip", "-n", ns, "link", "set", "lo", "up"])

    def exec_prefix(self, ns: str) -> list[str]:
        return ["ip", "netns", "exec", ns]

    def remove(self) -> None:
        while self._created:
            subprocess.run(["ip", "netns", "del", self._created.pop()], capture_output=True)


def time_cat(path: str, repeats: int) -> list[float]:
    subprocess.run(["cat", path], stdout=subprocess.DEVNULL, check=True)  # warm the page cache
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        subprocess.run(["cat", path], stdout=subprocess.DEVNULL, check=True)
        times.append(time.perf_counter() - started)
    return times


def summarize(name: str, runs: dict[str, list[dict[str, float]]], size: int, cat_mb_s: float) -> list[dict[str, Any]]:
    rows = []
    for mode, samples in runs.items():
        seconds = median([s["seconds"] for s in samples])
        cpu = median([s["client_cpu_s"] / s["seconds"] for s in samples])
        mb_s = size / MB / seconds
        speeds = [size / MB / s["seconds"] for s in samples]
        rows.append({"path": name, "mode": mode, "median_seconds": seconds, "mb_per_s": mb_s,
                     "min_mb_per_s": min(speeds), "max_mb_per_s": max(speeds),
                     "ratio_to_cat": mb_s / cat_mb_s, "client_cpu_share": cpu, "runs": samples})
    return rows


def plaintext_args(args: list[str]) -> list[str]:
    """A daemon's arguments without its --tls-dir (the same layerstore, in plaintext)."""
    if "--tls-dir" not in args:
        return list(args)
    at = args.index("--tls-dir")
    return args[:at] + args[at + 2:]


def tls_ratios(results: list[dict[str, Any]]) -> dict[str, float]:
    plain = {r["mode"]: r["mb_per_s"] for r in results if r["path"] == "loopback"}
    return {r["mode"]: r["mb_per_s"] / plain[r["mode"]] for r in results if r["path"] == "loopback, mutual TLS"}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7, help="timed reads per mode and path (default %(default)s)")
    parser.add_argument("--blob-mib", type=int, default=256, help="size of the served blob in MiB (default %(default)s)")
    parser.add_argument("--skip-netns", action="store_true", help="loopback only")
    parser.add_argument("--tls", action="store_true",
                        help="also read over mutual TLS on loopback, interleaved with plaintext (ratio TLS ÷ plaintext)")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the results as JSON here")
    parser.add_argument("--workdir", type=Path, default=None, help="where the temp dir goes (default: system temp dir)")
    # The client half, run by this script as a subprocess (under `ip netns exec` for the veth path).
    parser.add_argument("--client", action="append", default=[], metavar="HOST:PORT", help=argparse.SUPPRESS)
    parser.add_argument("--tls-client", action="append", default=[], metavar="HOST:PORT", help=argparse.SUPPRESS)
    parser.add_argument("--tls-dir", help=argparse.SUPPRESS)
    parser.add_argument("--digest", help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--blob-digest", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.client:
        return client_main(args)

    require("docker-registry", "skopeo", "mkfs.erofs", "ip", "cat")
    exit_on_sigterm()
    from afsd.lab.daemons import Daemon, layerstore_daemon
    from afsd.lab.pki import LabPki
    from afsd.lab.ports import reserve_port
    from afsd.lab.registry import start_registry

    document: dict[str, Any] = {"benchmark": "readlayer", "machine_before": machine_facts(), "repeats": args.repeats}
    workdir = Path(tempfile.mkdtemp(prefix="afsd-readlayer-bench-", dir=args.workdir))
    registry = None
    daemons: list[Daemon] = []
    namespaces = Namespaces()
    try:
        print(f"setting up: {args.blob_mib} MiB random layer, registry, layerstore, PullImage ...", flush=True)
        registry = start_registry(workdir / "registry")
        content = write_random_file(workdir / "blob-content.bin", args.blob_mib * MIB)
        reference, _ = push_single_file_image(registry.address, workdir, "readlayer", content)
        content.unlink()
        pki = LabPki(workdir / "pki") if args.tls else None
        loopback = layerstore_daemon(workdir, "bench-node", [], registry_args=["--insecure-registry", registry.address],
                                     metrics=False, tls_dir=pki.node("bench-node") if pki else None)
        daemons.append(loopback)
        loopback.start()
        # With --tls, this layerstore (and its signed blob) runs with TLS; a plaintext one serves the same cache.
        tls_server = (loopback.address, pki.node("bench-client")) if pki else None
        layer = asyncio.run(_pull(loopback.address, reference, tls_server[1] if tls_server else None))
        if pki is not None:
            plain_args = plaintext_args(loopback.args)
            plain_args[plain_args.index("--admin-socket") + 1] = str(workdir / "plain-admin.sock")
            held = reserve_port("127.0.0.1")   # held while the daemon lives: no other process can take it
            plain_args[plain_args.index("--listen") + 1] = held.address
            plain = Daemon("bench-node-plain", plain_args, "127.0.0.1", held.port, workdir / "bench-node-plain.log",
                           reservation=held)
            daemons.append(plain)
            plain.start()
        document["blob"] = {k: layer[k] for k in ("digest", "size", "blob_digest")}
        size = layer["size"]
        print(f"blob {layer['blob_digest'][:19]}, {size:,} bytes", flush=True)

        cat_times = time_cat(layer["cache_path"], args.repeats)
        cat_mb_s = size / MB / median(cat_times)
        document["cat"] = {"runs_seconds": cat_times, "median_seconds": median(cat_times), "mb_per_s": cat_mb_s}

        print(f"(a) loopback: {args.repeats} x {len(MODES)} reads" + (" each, plaintext and TLS" if pki else "")
              + " ...", flush=True)
        if pki is None:
            results = summarize("loopback", run_client([], loopback.address, layer, args.repeats)[loopback.address],
                                size, cat_mb_s)
        else:
            runs = run_client([], plain.address, layer, args.repeats, tls_server)
            results = summarize("loopback", runs[plain.address], size, cat_mb_s)
            results += summarize("loopback, mutual TLS", runs[loopback.address], size, cat_mb_s)
            document["tls_over_plaintext"] = tls_ratios(results)
            plain.stop()
        loopback.stop()

        if not args.skip_netns:
            print(f"(b) veth between namespaces: {args.repeats} x {len(MODES)} reads ...", flush=True)
            namespaces.create()
            listen_args = plaintext_args(loopback.args)
            listen_args[listen_args.index("--listen") + 1] = f"{SERVER_ADDRESS}:{SERVER_PORT}"
            in_namespace = Daemon("bench-node-netns", listen_args, SERVER_ADDRESS, SERVER_PORT,
                                  workdir / "bench-node-netns.log", prefix=namespaces.exec_prefix(namespaces.server))
            daemons.append(in_namespace)
            in_namespace.spawn()  # its port is not reachable from here: the client waits for it
            try:
                runs = run_client(namespaces.exec_prefix(namespaces.client), in_namespace.address, layer,
                                  args.repeats)[in_namespace.address]
            except RuntimeError as error:
                raise RuntimeError(f"{error}\nlayerstore log:\n{in_namespace.log()[-2000:]}") from None
            results += summarize("veth (netns)", runs, size, cat_mb_s)
    finally:
        for daemon in daemons:
            daemon.stop()
        namespaces.remove()
        if registry is not None:
            registry.stop()
        shutil.rmtree(workdir, ignore_errors=True)

    document["results"] = results
    document["machine_after"] = machine_facts()
    print()
    cat_speeds = [size / MB / t for t in cat_times]
    table = [["local", "cat > /dev/null (baseline)", cat_mb_s, f"{min(cat_speeds):,.0f}-{max(cat_speeds):,.0f}",
              "1.000", "-"]]
    table += [[r["path"], r["mode"], r["mb_per_s"], f"{r['min_mb_per_s']:,.0f}-{r['max_mb_per_s']:,.0f}",
               f"{r['ratio_to_cat']:.3f}", f"{100 * r['client_cpu_share']:.0f}%"] for r in results]
    print_table(["path", "read", "MB/s", "min-max", "ratio/cat", "client CPU"], table)
    print(f"(medians of {args.repeats}, min-max across them; blob {size / MIB:.1f} MiB; ratio = throughput / cat throughput)")
    if "tls_over_plaintext" in document:
        print("\nmutual TLS ÷ plaintext (throughput, loopback, same run, interleaved):")
        print_table(["read", "TLS MB/s ÷ plaintext MB/s"],
                    [[mode, f"{ratio:.3f}"] for mode, ratio in document["tls_over_plaintext"].items()])
    print(f"\nload average before {document['machine_before']['load_average_1_5_15']}, after "
          f"{document['machine_after']['load_average_1_5_15']} on {os.cpu_count()} CPUs: client and server share "
          "these cores and other work may be running; compare ratios, not absolute numbers")
    write_json(args.json, document)
    return 0


if __name__ == "__main__":
    sys.exit(main())
