"""Row 1: peer range reads of a whole blob over loopback, against raw TCP `sendfile` -> `recv_into`.

The holder layerstore (a real daemon) holds one blob of `size_mib` MiB of random bytes. Measured in one
run, each the median of `repeats`:
- baseline: the holder's blob file sent by a thread of this process with `socket.sendfile` and received
  with `recv_into` into one reusable 4 MiB buffer (no verification): what the socket can carry here;
- `RangeFetcher.fetch(0, size)` (pieces in parallel, every chunk checked against the blob's chunk table,
  the bytes returned in memory), once per transport the fetcher offers (ReadLayer always; the negotiated
  byte stream when this checkout has it), with the holder's CPU seconds per GiB it served; and
  `RangeFetcher.fill(0, size)` into a sparse blob file, what a node's fetch worker does (each verified
  piece written into the blob as it arrives), where this checkout has it;
- candidates for the bulk byte path, in this process: raw TCP + sha256 of every 1 MiB chunk as it
  arrives (one stream and two), the same over TLS (pread + sendall: Python's ssl cannot sendfile), and
  grpc.aio server streaming of raw bytes (identity serializers, 4 MiB messages) and of protobuf-wrapped
  bytes, and one plain ReadLayer call (afsd's peer client, no verification).
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import inspect
import os
import socket
import ssl
import statistics
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc

from afsd.cluster.fetcher import RangeFetcher
from afsd.cluster.peers import LayerStorePeer
from afsd.ondemand.spec import BlobSpec
from afsd.rpc import ChannelPool
from bench._common import MB, MIB, print_table, write_random_file
from bench.datapath._lab import BenchLab, CpuMeter, HeldLayer, bytes_served, daemon_pid
from bench.datapath._report import Row, Section

GIB = 1 << 30
BUFFER = 4 * MIB


@dataclasses.dataclass
class Sample:
    seconds: float
    client_cpu: float = 0.0        # this process
    server_cpu: float = 0.0        # the holder layerstore (real daemon modes only)
    served: float = 0.0            # bytes the holder reported serving


def measure(lab: BenchLab, size_mib: int, repeats: int) -> Section:
    section = Section("peer range reads, whole blob, loopback")
    content = write_random_file(lab.work / "transport.bin", size_mib * MIB)
    (held,) = lab.hold(lab.push("transport", {"data/transport.bin": content}))
    content.unlink()
    size = held.spec.size
    modes: dict[str, Callable[[], Sample]] = {
        "raw TCP sendfile -> recv_into (baseline)": lambda: _raw_tcp(held.path, size, verify=None),
        "raw TCP + sha256 per chunk, 1 stream": lambda: _raw_tcp(held.path, size, verify=held.spec),
        "raw TCP + sha256 per chunk, 2 streams": lambda: _raw_tcp(held.path, size, verify=held.spec, streams=2),
        "TLS + sha256 per chunk, 1 stream": lambda: _raw_tcp(held.path, size, verify=held.spec, tls=True),
        "grpc.aio raw bytes (identity serializers)": lambda: asyncio.run(_grpc_stream(held.path, size, wrap=False)),
        "grpc.aio protobuf-wrapped bytes": lambda: asyncio.run(_grpc_stream(held.path, size, wrap=True)),
        "ReadLayer, one call, not verified": lambda: asyncio.run(_read_layer(lab, held)),
    }
    fetcher_modes = {"RangeFetcher (ReadLayer)": {"byte_stream": False} if _has_byte_stream() else {}}
    if _has_byte_stream():
        fetcher_modes["RangeFetcher (byte stream)"] = {"byte_stream": True}
    for name, options in fetcher_modes.items():
        modes[name] = lambda options=options: _fetch_whole(lab, held, options)
    if _has_byte_stream() and hasattr(RangeFetcher, "fill"):
        fetcher_modes["RangeFetcher.fill into a blob file (byte stream)"] = {"byte_stream": True}
        modes["RangeFetcher.fill into a blob file (byte stream)"] = lambda: _fill_whole(lab, held)
    if _tls_context_pair() is None:
        del modes["TLS + sha256 per chunk, 1 stream"]

    for mode in modes.values():
        mode()   # warm up: page cache, channels, code paths
    samples: dict[str, list[Sample]] = {name: [] for name in modes}
    for _ in range(repeats):
        for name, mode in modes.items():
            samples[name].append(mode())

    def mb_s(name: str) -> float:
        return size / MB / statistics.median(s.seconds for s in samples[name])

    baseline = mb_s(next(iter(modes)))
    details: dict[str, Any] = {"blob_bytes": size, "repeats": repeats, "modes": {}}
    print(f"\n{section.title}: {size / MIB:.0f} MiB blob, medians of {repeats}")
    table = []
    for name in modes:
        runs = samples[name]
        rate = mb_s(name)
        served = sum(s.served for s in runs)
        server_per_gib = sum(s.server_cpu for s in runs) / (served / GIB) if served else None
        client_per_gib = sum(s.client_cpu for s in runs) / (size * len(runs) / GIB)
        details["modes"][name] = {"mb_per_s": rate, "ratio_to_raw_tcp": rate / baseline,
                                  "runs_seconds": [s.seconds for s in runs],
                                  "client_cpu_s_per_gib": client_per_gib, "server_cpu_s_per_gib": server_per_gib}
        table.append([name, rate, f"{rate / baseline:.3f}", f"{client_per_gib:.2f}",
                      "-" if server_per_gib is None else f"{server_per_gib:.2f}"])
    print_table(["transport", "MB/s", "÷ raw TCP", "this process CPU s/GiB", "layerstore CPU s/GiB served"], table)

    best = max(fetcher_modes, key=mb_s)
    section.rows.append(Row(
        "peer range reads, whole blob (RangeFetcher, verified)", f"{mb_s(best):,.0f} MB/s [{best}]",
        f"{baseline:,.0f} MB/s raw TCP", mb_s(best) / baseline, "≥ 0.5", details=details))
    for name in fetcher_modes:
        per_gib = details["modes"][name]["server_cpu_s_per_gib"]
        if per_gib is not None:
            section.rows.append(Row(f"layerstore CPU per GiB served [{name}]", f"{per_gib:.2f} CPU s/GiB", "-",
                                    None, "reported, halved"))
    return section


def _has_byte_stream() -> bool:
    return "byte_stream" in inspect.signature(RangeFetcher).parameters


# -- afsd's own clients against the holder daemon ---------------------------------------------------------


def _metered(lab: BenchLab, work: Callable[[], Any]) -> Sample:
    meter = CpuMeter(lambda: [daemon_pid(lab.holder)])
    served_before = bytes_served(lab.holder)
    meter.start()
    cpu, started = time.process_time(), time.perf_counter()
    work()
    seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
    return Sample(seconds, cpu, meter.stop(), bytes_served(lab.holder) - served_before)


def _fetch_whole(lab: BenchLab, held: HeldLayer, options: dict[str, Any]) -> Sample:
    spec = dataclasses.replace(held.spec, providers=(lab.holder.address,))

    async def fetch() -> None:
        channels = ChannelPool()
        fetcher = RangeFetcher(spec, discovery=None, channels=channels, **options)
        try:
            fetched = await fetcher.fetch(0, spec.size)
            assert fetched.offset == 0 and len(fetched.data) == spec.size
        finally:
            await fetcher.close()
            await channels.close()

    return _metered(lab, lambda: asyncio.run(fetch()))


def _fill_whole(lab: BenchLab, held: HeldLayer) -> Sample:
    """The whole blob into a fresh sparse file, as a fetch worker fills a blob (hole_sink: only holes written)."""
    from afsd.ondemand.sinks import hole_sink
    from afsd.ondemand.sparse import open_sized
    from afsd.ondemand.spec import Priority

    spec = dataclasses.replace(held.spec, providers=(lab.holder.address,))
    path = lab.work / "transport-fill.blob"
    path.unlink(missing_ok=True)

    async def fill() -> None:
        channels = ChannelPool()
        fetcher = RangeFetcher(spec, discovery=None, channels=channels, byte_stream=True)
        sink = hole_sink(open_sized(path, spec.size), spec.size)
        try:
            filled = await fetcher.fill(0, spec.size, Priority.DEMAND, sink)
            assert filled.written == spec.size
        finally:
            sink.close()
            await fetcher.close()
            await channels.close()

    try:
        return _metered(lab, lambda: asyncio.run(fill()))
    finally:
        path.unlink(missing_ok=True)


async def _read_layer(lab: BenchLab, held: HeldLayer) -> Sample:
    channels = ChannelPool()
    try:
        peer = LayerStorePeer(lab.holder.address, channels)
        await asyncio.wait_for(channels.get(lab.holder.address).channel_ready(), 60)

        async def read() -> int:
            return sum([len(data) async for _, data in peer.read_stream(held.spec.layer_digest, 0, held.spec.size)])

        served_before = bytes_served(lab.holder)
        meter = CpuMeter(lambda: [daemon_pid(lab.holder)])
        meter.start()
        cpu, started = time.process_time(), time.perf_counter()
        got = await read()
        seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
        assert got == held.spec.size
        return Sample(seconds, cpu, meter.stop(), bytes_served(lab.holder) - served_before)
    finally:
        await channels.close()


# -- candidates, client and server in this process -----------------------------------------------------------


def _tls_context_pair() -> tuple[ssl.SSLContext, ssl.SSLContext] | None:
    try:
        from tests.support.tls import context_pair
    except ImportError:   # the test extras (cryptography) are not installed
        return None
    return context_pair()


def _raw_tcp(path: Path, size: int, *, verify: BlobSpec | None, streams: int = 1, tls: bool = False) -> Sample:
    """`streams` connections each carrying an equal share of the file (whole chunks), sent with sendfile
    (TLS: pread + sendall), received with recv_into into one reusable buffer; with `verify`, every chunk
    hashed as it completes."""
    chunk = verify.chunk_size if verify else MIB
    chunks = -(-size // chunk)
    bounds = [(i * chunks // streams * chunk, min(size, (i + 1) * chunks // streams * chunk)) for i in range(streams)]
    contexts = _tls_context_pair() if tls else None
    listener = socket.create_server(("127.0.0.1", 0), backlog=streams)
    port = listener.getsockname()[1]

    def serve() -> None:
        threads = []
        for _ in bounds:
            conn, _ = listener.accept()
            threads.append(threading.Thread(target=_send, args=(conn, path, contexts)))
            threads[-1].start()
        for thread in threads:
            thread.join()

    server = threading.Thread(target=serve)
    server.start()
    cpu, started = time.process_time(), time.perf_counter()
    received: list[int] = []
    clients = [threading.Thread(target=_receive, args=(port, start, end, verify, contexts, received))
               for start, end in bounds]
    for client in clients:
        client.start()
    for client in clients:
        client.join()
    seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
    server.join()
    listener.close()
    if sum(received) != size:
        raise RuntimeError(f"raw TCP moved {sum(received)} of {size} bytes")
    return Sample(seconds, cpu)


def _send(conn: socket.socket, path: Path, contexts: tuple[ssl.SSLContext, ssl.SSLContext] | None) -> None:
    """Serve one connection: it names its range first (two u64), then gets those bytes."""
    with conn, open(path, "rb") as source:
        stream = contexts[0].wrap_socket(conn, server_side=True) if contexts is not None else conn
        header = b""
        while len(header) < 16:
            more = stream.recv(16 - len(header))
            if not more:
                return
            header += more
        start, end = int.from_bytes(header[:8], "big"), int.from_bytes(header[8:], "big")
        if contexts is None:
            stream.sendfile(source, start, end - start)
            return
        position = start
        while position < end:
            data = os.pread(source.fileno(), min(BUFFER, end - position), position)
            stream.sendall(data)
            position += len(data)
        stream.close()


def _receive(port: int, start: int, end: int, verify: BlobSpec | None,
             contexts: tuple[ssl.SSLContext, ssl.SSLContext] | None, received: list[int]) -> None:
    sock = socket.create_connection(("127.0.0.1", port))
    if contexts is not None:
        sock = contexts[1].wrap_socket(sock, server_hostname="localhost")
    chunk = verify.chunk_size if verify else BUFFER
    buffer = memoryview(bytearray(chunk))
    position = start
    sock.sendall(start.to_bytes(8, "big") + end.to_bytes(8, "big"))
    with sock:
        while position < end:
            want, filled = min(chunk, end - position), 0
            while filled < want:
                count = sock.recv_into(buffer[filled:want])
                if not count:
                    raise RuntimeError("the sender closed early")
                filled += count
            if verify is not None and hashlib.sha256(buffer[:want]).digest() != verify.chunk_digests[position // chunk]:
                raise RuntimeError(f"chunk at {position} does not match")
            position += want
    received.append(end - start)


async def _grpc_stream(path: Path, size: int, *, wrap: bool) -> Sample:
    """grpc.aio server streaming of the file in 4 MiB messages, as raw bytes or inside BytesValue."""
    from google.protobuf import wrappers_pb2

    async def handler(request: bytes, context: grpc.aio.ServicerContext):
        fd = os.open(path, os.O_RDONLY)
        try:
            position = 0
            while position < size:
                data = await asyncio.to_thread(os.pread, fd, BUFFER, position)
                position += len(data)
                yield wrappers_pb2.BytesValue(value=data) if wrap else data
        finally:
            os.close(fd)

    serialize = (lambda message: message.SerializeToString()) if wrap else None
    parse = wrappers_pb2.BytesValue.FromString if wrap else None
    handlers = grpc.method_handlers_generic_handler("bench.Bytes", {"Read": grpc.unary_stream_rpc_method_handler(
        handler, request_deserializer=None, response_serializer=serialize)})
    options = [("grpc.max_receive_message_length", 8 * MIB), ("grpc.max_send_message_length", 8 * MIB)]
    server = grpc.aio.server(options=options)
    server.add_generic_rpc_handlers((handlers,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=options) as channel:
            call = channel.unary_stream("/bench.Bytes/Read", request_serializer=None, response_deserializer=parse)
            cpu, started, got = time.process_time(), time.perf_counter(), 0
            async for message in call(b""):
                got += len(message.value if wrap else message)
            seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
    finally:
        await server.stop(None)
    if got != size:
        raise RuntimeError(f"gRPC moved {got} of {size} bytes")
    return Sample(seconds, cpu)
