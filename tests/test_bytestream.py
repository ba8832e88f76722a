"""The byte-stream bulk path: real layerstores serving blob ranges with sendfile to ticket holders, over
loopback and between two network namespaces; hostile data listeners; ticket misuse; TLS; and falling back
to ReadLayer where no byte stream is offered.

One registry and two layerstores (processes) are shared by the module: `streaming` with its default data
listener, `plain` started with `--data-listen none`. Both hold one image, pulled once.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import ipaddress
import json
import os
import secrets
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import pytest_asyncio

from afsd.api import layerstore_pb2 as lpb
from afsd.api import layerstore_pb2_grpc as lgrpc
from afsd.cluster.bytestream_client import BlobByteStreams, ByteStreamUnavailable
from afsd.cluster.bytestream_server import ByteStreamServer
from afsd.cluster.bytestream_wire import HELLO, MAGIC, REPLY, REQUEST, VERSION, Status, digest_bytes
from afsd.cluster.fetcher import RangeFetcher
from afsd.cluster.peers import blob_spec_from_stat
from afsd.errors import FetchError
from afsd.lab.daemons import Daemon, layerstore_daemon, start_all
from afsd.lab.ports import reserve_port
from afsd.lab.registry import start_registry
from afsd.ondemand.chunks import ChunkTable
from afsd.ondemand.fanotify.blobfile import METADATA_GAP
from afsd.ondemand.metadata import metadata_spans
from afsd.ondemand.spec import BlobSpec, Priority
from afsd.rpc import ChannelPool
from tests.support.bytestream_peers import HOSTILE_BEHAVIOURS, ByteStreamPeer, HostileDataListener
from tests.support.cluster import LocalCluster, small_image
from tests.support.metrics import daemon_metrics, metric

pytestmark = pytest.mark.asyncio(loop_scope="module")

MIB = 1 << 20
REPO = Path(__file__).resolve().parents[1]


@dataclass
class Shared:
    cluster: LocalCluster
    streaming: Daemon
    plain: Daemon
    spec: BlobSpec
    blob: Path                 # the streaming layerstore's blob file
    channels: ChannelPool

    def fetcher(self, *providers: str, **options: object) -> RangeFetcher:
        spec = dataclasses.replace(self.spec, providers=providers)
        return RangeFetcher(spec, discovery=None, channels=self.channels, **options)  # type: ignore[arg-type]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def shared(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Shared]:
    workdir = tmp_path_factory.mktemp("bytestream")
    registry = await asyncio.to_thread(start_registry, workdir / "registry")
    cluster = LocalCluster(workdir, registry)
    channels = ChannelPool()
    try:
        streaming = layerstore_daemon(workdir, "streaming", [], registry_args=cluster.registry_args)
        plain = layerstore_daemon(workdir, "plain", [], registry_args=cluster.registry_args)
        plain.args += ["--data-listen", "none"]
        cluster.layerstores += [streaming, plain]
        await asyncio.to_thread(start_all, [streaming, plain])
        image = await cluster.push("streamed", small_image("streamed", 9 * MIB + 12345, layers=1))
        (layer,) = (await cluster.pull(streaming, image)).layers
        await cluster.pull(plain, image)
        stat = await cluster.layerstore(streaming).StatLayer(lpb.StatLayerRequest(digest=layer.digest))
        yield Shared(cluster, streaming, plain, blob_spec_from_stat(stat), Path(layer.cache_path), channels)
    finally:
        await channels.close()
        await cluster.close()
        await asyncio.to_thread(cluster.stop)


async def served(daemon: Daemon) -> dict[str, float]:
    text = await asyncio.to_thread(daemon_metrics, daemon)
    return {"stream": metric(text, "afsd_layerstore_stream_bytes_served_total"),
            "read_layer": metric(text, "afsd_layerstore_bytes_served_total")}


async def open_tickets(shared: Shared, digest: str | None = None, streams: int = 2) -> lpb.OpenByteStreamResponse:
    stub = lgrpc.LayerStoreStub(shared.channels.get(shared.streaming.address))
    return await stub.OpenByteStream(lpb.OpenByteStreamRequest(digest=digest or shared.spec.layer_digest,
                                                               streams=streams))


# -- reading ----------------------------------------------------------------------------------------------


async def test_a_fetch_reads_over_the_byte_stream_exactly_and_verified(shared: Shared) -> None:
    blob = await asyncio.to_thread(shared.blob.read_bytes)
    before = await served(shared.streaming)
    fetcher = shared.fetcher(shared.streaming.address)
    try:
        whole = await fetcher.fetch(0, shared.spec.size)
        assert whole.offset == 0 and whole.data == blob
        ranges = [(0, 1), (2 * MIB + 5, 2 * MIB), (shared.spec.size - 1, 1)]   # no chunk shared: each is read
        results = await asyncio.gather(*(fetcher.fetch(offset, length) for offset, length in ranges))
        fetched = len(whole.data) + sum(len(r.data) for r in results)
        assert all(r.data == blob[r.offset:r.offset + len(r.data)] for r in results)
        stats = fetcher.stats()
        assert stats["failovers"] == stats["verification_failures"] == stats["errors"] == 0
    finally:
        await fetcher.close()
    after = await served(shared.streaming)
    # Every byte came over the byte stream, none with ReadLayer.
    assert after["stream"] - before["stream"] == fetched
    assert after["read_layer"] == before["read_layer"]


async def test_a_layerstore_without_a_data_listener_is_read_with_read_layer(shared: Shared) -> None:
    blob = await asyncio.to_thread(shared.blob.read_bytes)
    for daemon, options in ((shared.plain, {}), (shared.streaming, {"byte_stream": False})):
        before = await served(daemon)
        fetcher = shared.fetcher(daemon.address, **options)
        try:
            for _ in range(2):   # the second read does not ask for a byte stream again
                result = await fetcher.fetch(2 * MIB, 3 * MIB)
                assert result.data == blob[2 * MIB:5 * MIB]
            assert fetcher.stats()["failovers"] == 0
        finally:
            await fetcher.close()
        after = await served(daemon)
        assert after["read_layer"] - before["read_layer"] == 6 * MIB and after["stream"] == before["stream"]
    with pytest.raises(Exception) as unimplemented:
        await lgrpc.LayerStoreStub(shared.channels.get(shared.plain.address)).OpenByteStream(
            lpb.OpenByteStreamRequest(digest=shared.spec.layer_digest, streams=1))
    assert "no byte-stream listener" in str(unimplemented.value)


async def test_a_peer_that_cannot_be_reached_on_its_data_port_is_read_with_read_layer(shared: Shared) -> None:
    """OpenByteStream answers, but nothing listens where it points (a firewall, a NAT): ReadLayer it is."""
    with reserve_port() as held:   # bound, never listening: connections are refused, nobody else can listen
        streams = BlobByteStreams(shared.plain.address, _RedirectingStub(held.port, shared.spec.size),
                                  shared.spec.layer_digest,
                                  ChunkTable(shared.spec.size, shared.spec.chunk_size, shared.spec.chunk_digests))
        with pytest.raises(ByteStreamUnavailable, match="cannot connect"):
            await streams.read(0, shared.spec.chunk_size, 5.0, _ignore)
    assert not streams.usable   # and it stops trying for a while


def _ignore(offset: int, data: memoryview) -> None:
    pass


class _RedirectingStub:
    """OpenByteStream's answer from a layerstore whose data port nobody can reach."""

    def __init__(self, port: int, size: int) -> None:
        self.port = port
        self.size = size

    async def OpenByteStream(self, request: lpb.OpenByteStreamRequest, timeout: float) -> lpb.OpenByteStreamResponse:
        return lpb.OpenByteStreamResponse(port=self.port, tickets=[secrets.token_bytes(32)], ticket_ttl_ms=30_000,
                                          afs_size=self.size)


# -- hostile data listeners --------------------------------------------------------------------------------


@pytest.mark.parametrize("behaviour", HOSTILE_BEHAVIOURS)
async def test_a_hostile_byte_stream_is_caught_and_another_provider_serves(shared: Shared, behaviour: str) -> None:
    blob = await asyncio.to_thread(shared.blob.read_bytes)
    listener = HostileDataListener(shared.blob, behaviour)
    try:
        async with ByteStreamPeer(listener, shared.spec.size) as hostile:
            # The hostile peer ranks first (it is the "local" one); the real layerstore is the fallback.
            fetcher = shared.fetcher(hostile.address, shared.streaming.address, local_endpoint=hostile.address,
                                     call_timeout=2.0)
            try:
                started = time.monotonic()
                result = await fetcher.fetch(4 * MIB, MIB)
                assert result.data == blob[4 * MIB:5 * MIB]
                assert result.source == f"peer:{shared.streaming.address}"
                stats = fetcher.stats()
                print(f"{behaviour}: served by the other provider after {time.monotonic() - started:.2f} s; "
                      f"{[p['last_error'] for p in stats['providers'] if p['endpoint'] == hostile.address]}")
                assert stats["failovers"] == 1 and hostile.opened == 1
                assert stats["verification_failures"] == (1 if behaviour == "wrong_bytes" else 0)
            finally:
                await fetcher.close()

            alone = shared.fetcher(hostile.address, call_timeout=2.0)
            try:
                with pytest.raises(FetchError) as failed:
                    await asyncio.wait_for(alone.fetch(0, 1), 60)   # a guard against hanging
            finally:
                await alone.close()
            expected = {"wrong_bytes": "does not match the blob's chunk digest", "short": "closed the stream after",
                        "huge_length": f"announced {1 << 62} bytes", "huge_error": "an error of",
                        "stall": "too slowly", "trickle": "too slowly", "garbage_reply": "malformed reply"}[behaviour]
            assert hostile.address in str(failed.value) and expected in str(failed.value), str(failed.value)

            # A metadata read by its digest (from the best provider only) fails on it too, naming it and why;
            # the whole-chunk fallback then reads from the other provider (the hostile one cooled down).
            spans = shared.spec.metadata_ranges()   # (wrong_bytes flips mid-span: a metadata byte)
            fetcher = shared.fetcher(hostile.address, shared.streaming.address, local_endpoint=hostile.address,
                                     call_timeout=2.0)
            try:
                with pytest.raises(FetchError) as failed:
                    await asyncio.wait_for(fetcher.fetch_metadata(spans), 60)
                expected = {"wrong_bytes": "does not match the blob's metadata digest",
                            "short": "closed the stream during bytes"}.get(behaviour, expected)
                assert hostile.address in str(failed.value) and expected in str(failed.value), str(failed.value)
                result = await fetcher.fetch(*spans[0])
                assert result.source == f"peer:{shared.streaming.address}"
                assert result.data == blob[result.offset:result.offset + len(result.data)]
                assert fetcher.stats()["verification_failures"] == (1 if behaviour == "wrong_bytes" else 0)
            finally:
                await fetcher.close()
    finally:
        listener.close()


async def test_a_long_fill_hands_on_only_the_units_before_a_forged_one(shared: Shared) -> None:
    """A read of several units checks each one while the next arrives; a forged unit in the middle ends the
    read there: the sink has the verified units before it, in order, and nothing from it or after it."""
    blob = await asyncio.to_thread(shared.blob.read_bytes)
    listener = HostileDataListener(shared.blob, "wrong_bytes")   # flips a byte in the middle: unit 2 of 4
    written: list[tuple[int, bytes]] = []

    class Recording:
        def write(self, offset: int, data: memoryview) -> int:
            written.append((offset, bytes(data)))
            return len(data)

    try:
        async with ByteStreamPeer(listener, shared.spec.size) as hostile:
            fetcher = shared.fetcher(hostile.address, call_timeout=5.0)
            try:
                with pytest.raises(FetchError, match="does not match the blob's chunk digest"):
                    await asyncio.wait_for(fetcher.fill(0, 4 * MIB, Priority.DEMAND, Recording()), 60)
            finally:
                await fetcher.close()
    finally:
        listener.close()
    assert [offset for offset, _ in written] == [0, MIB]
    assert b"".join(data for _, data in written) == blob[:2 * MIB]


# -- metadata by its digest ---------------------------------------------------------------------------------


async def test_metadata_spans_are_read_as_they_are_and_checked_by_the_metadata_digest(shared: Shared) -> None:
    blob = await asyncio.to_thread(shared.blob.read_bytes)
    spans = metadata_spans(shared.spec.metadata_ranges(), METADATA_GAP)
    expected = b"".join(blob[offset:offset + length] for offset, length in spans)
    for daemon, transport in ((shared.streaming, "stream"), (shared.plain, "read_layer")):
        before = await served(daemon)
        fetcher = shared.fetcher(daemon.address)
        try:
            fetched = await fetcher.fetch_metadata(spans)
        finally:
            await fetcher.close()
        assert fetched.spans == tuple(spans) and fetched.data == expected
        after = await served(daemon)
        assert after[transport] - before[transport] == len(expected), transport   # exactly the spans, no chunks
        assert sum(after.values()) - sum(before.values()) == len(expected), transport


# -- tickets ------------------------------------------------------------------------------------------------


def _hello(port: int, ticket: bytes, digest: str, *, source: str = "127.0.0.1") -> tuple[socket.socket, int, bytes]:
    """Connect (from `source`), present `ticket` for `digest`; returns the socket, the reply's status and
    its error text (empty when OK)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0))
    sock.sendall(HELLO.pack(MAGIC, VERSION, ticket, digest_bytes(digest)))
    return sock, *_reply(sock)


def _reply(sock: socket.socket) -> tuple[int, bytes]:
    status, length = REPLY.unpack(_exactly(sock, REPLY.size))
    return status, b"" if status == Status.OK else _exactly(sock, length)


def _exactly(sock: socket.socket, count: int) -> bytes:
    data = b""
    while len(data) < count:
        more = sock.recv(count - len(data))
        assert more, f"closed after {len(data)} of {count} bytes"
        data += more
    return data


async def test_tickets_open_one_connection_for_one_blob_from_the_caller_only(shared: Shared) -> None:
    grant = await open_tickets(shared, streams=5)
    assert len(grant.tickets) == 5 and grant.afs_size == shared.spec.size and not grant.tls
    assert grant.host == "" and 0 < grant.port < 65536 and grant.ticket_ttl_ms > 0
    digest, port = shared.spec.layer_digest, grant.port
    blob = await asyncio.to_thread(shared.blob.read_bytes)
    first, reused, other_blob, other_caller, bad_range = grant.tickets

    sock, status, _ = await asyncio.to_thread(_hello, port, first, digest)
    with sock:
        assert status == Status.OK
        for offset, length in ((0, 4096), (MIB + 3, 70_000)):   # any range, any number of times
            sock.sendall(REQUEST.pack(offset, length))
            status, _ = _reply(sock)
            assert status == Status.OK and _exactly(sock, length) == blob[offset:offset + length]
    sock, status, why = await asyncio.to_thread(_hello, port, first, digest)   # used already
    sock.close()
    assert status == Status.DENIED and b"unknown or was used" in why

    another = "sha256:" + hashlib.sha256(b"another layer").hexdigest()
    sock, status, why = await asyncio.to_thread(_hello, port, other_blob, another)
    sock.close()
    assert status == Status.DENIED and digest.encode() in why
    sock, status, why = await asyncio.to_thread(_hello, port, other_blob, digest)   # used up by the wrong try
    sock.close()
    assert status == Status.DENIED

    sock, status, why = await asyncio.to_thread(_hello, port, other_caller, digest, source="127.0.0.2")
    sock.close()
    assert status == Status.DENIED and b"granted to 127.0.0.1, not 127.0.0.2" in why

    sock, status, _ = await asyncio.to_thread(_hello, port, bad_range, digest)
    with sock:   # requests sent at once are answered in order (small ones together), up to a bad one
        assert status == Status.OK
        good = [(at * 7919, 100 + at) for at in range(300)] + [(3, 70_000), (MIB, 4096)]
        bad = (shared.spec.size - 10, 11)
        sock.sendall(b"".join(REQUEST.pack(*request) for request in (*good, bad, (0, 4096))))
        for offset, length in good:
            status, _ = _reply(sock)
            assert status == Status.OK and _exactly(sock, length) == blob[offset:offset + length]
        status, why = _reply(sock)
        assert status == Status.BAD_REQUEST and b"outside the blob" in why
        assert sock.recv(1) == b""   # and the connection is closed: nothing after the bad request

    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:   # not a hello at all
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + b"\0" * HELLO.size)
        status, why = _reply(sock)
        assert status == Status.BAD_REQUEST

    sock, status, why = await asyncio.to_thread(_hello, port, reused, digest)
    sock.close()
    assert status == Status.OK   # the unused ticket still works
    text = await asyncio.to_thread(daemon_metrics, shared.streaming)
    for reason in ("unknown_ticket", "wrong_blob", "wrong_caller", "bad_range", "bad_hello"):
        assert metric(text, "afsd_layerstore_stream_refused_total", reason=reason) >= 1, reason


async def test_open_byte_stream_rejects_what_the_layerstore_does_not_hold(shared: Shared) -> None:
    with pytest.raises(Exception) as missing:
        await open_tickets(shared, "sha256:" + hashlib.sha256(b"nothing").hexdigest())
    assert "NOT_FOUND" in repr(missing.value) or "not in this layerstore" in str(missing.value)
    with pytest.raises(Exception) as invalid:
        await open_tickets(shared, "sha256:nothex")
    assert "invalid layer digest" in str(invalid.value)


async def test_a_ticket_expires(tmp_path: Path) -> None:
    blob = tmp_path / "blob"
    blob.write_bytes(os.urandom(8192))
    digest = "sha256:" + hashlib.sha256(b"layer").hexdigest()
    server = ByteStreamServer("127.0.0.1", 0, lambda d: (str(blob), 8192) if d == digest else None, ticket_ttl=0.3)
    server.start()
    try:
        soon, later = server.grant(digest, ipaddress.ip_address("127.0.0.1"), 2)
        sock, status, _ = await asyncio.to_thread(_hello, server.port, soon, digest)
        sock.close()
        assert status == Status.OK
        await asyncio.sleep(0.5)
        sock, status, why = await asyncio.to_thread(_hello, server.port, later, digest)
        sock.close()
        assert status == Status.DENIED and b"expired" in why
    finally:
        await asyncio.to_thread(server.close)


async def test_a_blob_evicted_between_requests_sent_together_is_gone_for_the_rest(tmp_path: Path) -> None:
    """Small ranges asked for at once are answered together, and a blob the layerstore let go of in the
    meantime fails the next run of them with GONE, as it fails the next single request."""
    blob = tmp_path / "blob"
    data = os.urandom(64 << 10)
    blob.write_bytes(data)
    digest = "sha256:" + hashlib.sha256(b"layer").hexdigest()
    held = {digest: (str(blob), len(data))}
    server = ByteStreamServer("127.0.0.1", 0, held.get)
    server.start()
    try:
        (ticket,) = server.grant(digest, ipaddress.ip_address("127.0.0.1"), 1)
        sock, status, _ = await asyncio.to_thread(_hello, server.port, ticket, digest)
        with sock:
            assert status == Status.OK
            spans = [(at * 300, 200) for at in range(100)]
            sock.sendall(b"".join(REQUEST.pack(*span) for span in spans))
            for offset, length in spans:
                status, _ = await asyncio.to_thread(_reply, sock)
                assert status == Status.OK and _exactly(sock, length) == data[offset:offset + length]
            del held[digest]   # evicted
            sock.sendall(b"".join(REQUEST.pack(*span) for span in spans))
            status, why = await asyncio.to_thread(_reply, sock)
            assert status == Status.GONE and b"evicted" in why
            assert sock.recv(1) == b""
    finally:
        await asyncio.to_thread(server.close)


# -- TLS ----------------------------------------------------------------------------------------------------


async def test_the_data_socket_can_speak_tls(shared: Shared) -> None:
    from tests.support.tls import context_pair

    server_tls, client_tls = context_pair()
    blob = await asyncio.to_thread(shared.blob.read_bytes)
    digest, size = shared.spec.layer_digest, shared.spec.size
    data = ByteStreamServer("127.0.0.1", 0, lambda d: (str(shared.blob), size) if d == digest else None,
                            tls=server_tls)
    data.start()
    table = ChunkTable(size, shared.spec.chunk_size, shared.spec.chunk_digests)
    try:
        async with ByteStreamPeer(data, size) as peer:
            stub = lgrpc.LayerStoreStub(shared.channels.get(peer.address))
            streams = BlobByteStreams(peer.address, stub, digest, table, tls=client_tls)
            try:
                got = bytearray(3 * MIB)

                def deliver(offset: int, data: memoryview) -> None:
                    got[offset - MIB:offset - MIB + len(data)] = data

                await streams.read(MIB, 4 * MIB, 10.0, deliver)
                assert got == blob[MIB:4 * MIB]
            finally:
                await streams.close()
            without = BlobByteStreams(peer.address, stub, digest, table)
            with pytest.raises(ByteStreamUnavailable, match="speaks TLS"):
                await without.read(0, MIB, 10.0, _ignore)
    finally:
        await asyncio.to_thread(data.close)


# -- two network namespaces ----------------------------------------------------------------------------------


_NETNS_CLIENT = r"""
import asyncio, dataclasses, hashlib, json, sys
from afsd.cluster.fetcher import RangeFetcher
from afsd.ondemand.spec import BlobSpec, Priority
from afsd.rpc import ChannelPool

async def main():
    spec = BlobSpec.from_json(json.loads(sys.argv[1]))
    channels = ChannelPool()
    await asyncio.wait_for(channels.get(spec.providers[0]).channel_ready(), 60)
    fetcher = RangeFetcher(spec, discovery=None, channels=channels)
    try:
        whole = await fetcher.fetch(0, spec.size)
        print(json.dumps({"sha256": "sha256:" + hashlib.sha256(whole.data).hexdigest(), "stats": fetcher.stats()}))
    finally:
        await fetcher.close()
        await channels.close()

asyncio.run(main())
"""

_METRICS = r"""
import sys, urllib.request
print(urllib.request.urlopen(f"http://{sys.argv[1]}/metrics", timeout=30).read().decode())
"""


async def test_byte_streams_between_two_network_namespaces(shared: Shared, tmp_path: Path) -> None:
    """The streaming layerstore's cache served from inside one namespace, read from another over veth."""
    token = f"{os.getpid() % 10000}{secrets.token_hex(2)}"
    server_ns, client_ns = f"afsd-bs-s{token}", f"afsd-bs-c{token}"
    server_if, client_if = f"bs{token}s", f"bs{token}c"
    made: list[str] = []
    daemon: Daemon | None = None
    try:
        for ns in (server_ns, client_ns):
            _run("ip", "netns", "add", ns)
            made.append(ns)
        _run("ip", "link", "add", server_if, "netns", server_ns, "type", "veth", "peer", "name", client_if,
             "netns", client_ns)
        for ns, interface, address in ((server_ns, server_if, "10.47.0.1/24"), (client_ns, client_if, "10.47.0.2/24")):
            _run("ip", "-n", ns, "addr", "add", address, "dev", interface)
            _run("ip", "-n", ns, "link", "set", interface, "up")
            _run("ip", "-n", ns, "link", "set", "lo", "up")
        args = list(shared.streaming.args)
        args[args.index("--listen") + 1] = "10.47.0.1:50651"
        args[args.index("--admin-socket") + 1] = str(tmp_path / "admin.sock")
        args[args.index("--metrics-listen") + 1] = "127.0.0.1:50652"
        # The same cache directory: a second process serving it only reads (the module's daemon keeps running).
        daemon = Daemon("streaming-netns", args, "10.47.0.1", 50651, tmp_path / "netns.log",
                        prefix=["ip", "netns", "exec", server_ns])
        daemon.spawn()
        spec = dataclasses.replace(shared.spec, providers=("10.47.0.1:50651",))
        result = await asyncio.to_thread(
            subprocess.run, ["ip", "netns", "exec", client_ns, sys.executable, "-c", _NETNS_CLIENT,
                             json.dumps(spec.to_json())], capture_output=True, text=True, timeout=300, cwd=REPO)
        assert result.returncode == 0, result.stderr[-3000:] + daemon.log()[-2000:]
        read = json.loads(result.stdout.strip().splitlines()[-1])
        assert read["sha256"] == shared.spec.blob_digest
        assert read["stats"]["failovers"] == 0 and read["stats"]["bytes"]["peer"] == shared.spec.size
        metrics = await asyncio.to_thread(subprocess.run, ["ip", "netns", "exec", server_ns, sys.executable, "-c",
                                                           _METRICS, "127.0.0.1:50652"],
                                          capture_output=True, text=True, timeout=60)
        assert metric(metrics.stdout, "afsd_layerstore_stream_bytes_served_total") == shared.spec.size
        assert metric(metrics.stdout, "afsd_layerstore_bytes_served_total") == 0
    finally:
        if daemon is not None:
            daemon.stop()
        for ns in made:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def _run(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True)


async def test_a_bad_data_listen_address_is_one_clear_line(tmp_path: Path) -> None:
    for value, expected in (("nonsense", "expected a literal IP:PORT or 'none'"),
                            ("192.0.2.1:1", "cannot listen")):   # an address this machine does not have
        result = await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "afsd", "layerstore", "--listen", "127.0.0.1:0",
                                 "--node-id", "x", "--cache-dir", str(tmp_path / "cache"), "--admin-socket",
                                 str(tmp_path / "admin.sock"), "--data-listen", value],
                                capture_output=True, text=True, timeout=120, cwd=REPO)
        lines = result.stderr.strip().splitlines()
        assert result.returncode != 0 and len(lines) == 1 and expected in lines[0], result.stderr


@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
async def test_closing_the_listener_ends_idle_connections_at_once_and_busy_ones_are_refused(tmp_path: Path,
                                                                                           tls: bool) -> None:
    from tests.support.tls import context_pair

    server_tls, client_tls = context_pair()
    blob = tmp_path / "blob"
    blob.write_bytes(os.urandom(8192))
    digest = "sha256:" + hashlib.sha256(b"layer").hexdigest()
    server = ByteStreamServer("127.0.0.1", 0, lambda d: (str(blob), 8192), max_connections=1,
                              tls=server_tls if tls else None)
    server.start()
    try:
        first, second = server.grant(digest, ipaddress.ip_address("127.0.0.1"), 2)

        def connect(ticket: bytes) -> tuple[socket.socket, int, bytes]:
            sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
            if tls:
                sock = client_tls.wrap_socket(sock, server_hostname="localhost")
            sock.sendall(HELLO.pack(MAGIC, VERSION, ticket, digest_bytes(digest)))
            return sock, *_reply(sock)

        idle, status, _ = await asyncio.to_thread(connect, first)
        assert status == Status.OK
        if tls:   # refused before any handshake
            with pytest.raises((ssl.SSLError, OSError)):
                await asyncio.to_thread(connect, second)
        else:
            busy, status, why = await asyncio.to_thread(connect, second)
            busy.close()
            assert status == Status.BUSY and b"too many" in why
        started = time.monotonic()
        await asyncio.to_thread(server.close)
        assert time.monotonic() - started < 5
        assert await asyncio.to_thread(idle.recv, 1) == b""   # the server ended it
        idle.close()
    finally:
        await asyncio.to_thread(server.close)


async def test_tickets_go_to_tcp_callers_by_their_address() -> None:
    from afsd.cluster.bytestream_server import caller_address

    assert caller_address("ipv4:10.0.0.5:4711") == ipaddress.ip_address("10.0.0.5")
    assert caller_address("ipv6:[::1]:4711") == ipaddress.ip_address("::1")
    assert caller_address("ipv6:[::ffff:10.0.0.5]:4711") == ipaddress.ip_address("10.0.0.5")   # v4-mapped
    assert caller_address("unix:/run/afsd/layerstore.sock") is None
    assert caller_address("ipv4:not-an-address:1") is None
