"""Verified byte ranges of one layer's erofs blob, read from peer layerstores with failover.

Where it sits: an on-demand backend (afsd/ondemand/) gets a kernel miss in blob X and calls
`RangeFetcher.fetch(offset, length)`. The fetcher widens the range to whole chunks of the blob's chunk
table (at least `min_request` bytes), reads them with `layerstore.v1.LayerStore.ReadLayer` from a
layerstore holding the same blob, checks every chunk against the table, and returns exactly the
widened range, which the backend writes into the kernel's file.

How (the reference's DiscoveryBackedReaderAt, kept and tightened):
- Providers: `spec.providers` plus discovery's `FindProvider(layer)` answer, keeping only nodes that
  advertise this very blob digest for the layer (another converter makes other bytes). Ranked: the
  local layerstore first, then the others in a random order fixed per fetcher (spreads readers over
  peers), with providers in cooldown after a failure last. The fetcher sticks to the provider it
  holds a lease on while that works (it leaves a peer only for the local layerstore).
- Discovery is asked again every `refresh_period` while reading (in the background), and at once
  when every known provider failed a read; the read is then tried once more on what the answer lists,
  minus providers that gave a definitive failure (no such layer, bad bytes, stalled past the deadline).
- A lease (AcquireLayerLease, renewed every ttl/4) on the provider in use keeps its copy from being
  evicted, for as long as the fetcher is open; it is released on switch and on close. A failed renewal
  drops that provider and leases another at once. NOT_FOUND from AcquireLayerLease skips the provider
  (it lacks the layer), as does an unreachable one; any other refusal (UNIMPLEMENTED: an old
  layerstore) means reading without a lease.
- A request is split into pieces of at most `PIECE_BYTES` (whole chunks); each piece is one ReadLayer
  call bounded by `call_timeout`, and one "flight" that any concurrent request for the same chunks
  joins instead of fetching again (waiters are shielded: cancelling one does not cancel the flight).
- At most `max_concurrency` calls run at once; DEMAND pieces get a free slot before PREFETCH ones,
  a waiting PREFETCH piece that a DEMAND request joins is promoted, and PREFETCH pieces never take the
  last quarter of the slots (kept for DEMAND). (All three: flights.py.)
- Chunks are hashed in a worker thread (about 1 ms per MiB here), off the event loop.
- A piece is read over the provider's byte stream when it offers one (bytestream_client.py: raw bytes,
  sendfile on the other side, each chunk verified as it arrives), else with ReadLayer; `byte_stream=False`
  reads everything with ReadLayer.
- `fill(offset, length, priority, sink)` reads the same way but hands each verified piece to the sink
  (the blob file a fetch worker fills) from a thread of the byte stream, straight out of the connection's
  receive buffer: no bytes object per range, no copy in between. Fills share the gate with fetches, and
  concurrent fills of the same chunks share flights as fetches do.
- `fetch_metadata(spans)` reads a blob's metadata as it is, from one provider (no lease), and checks it
  against the blob's metadata digest instead of its chunks (metadata_reads.py).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import random
import time
import weakref
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import grpc

from afsd.api import layerstore_pb2 as pb
from afsd.cluster.bytestream_client import BlobByteStreams, ByteStreamError, ByteStreamUnavailable, Deliver
from afsd.cluster.discovery_client import DiscoveryClient, DiscoveryUnavailableError
from afsd.cluster.fetch_metrics import FETCH_METRICS
from afsd.cluster.flights import Delivery, Flight, FlightTable, PriorityGate, copy_joined
from afsd.cluster.metadata_reads import read_metadata
from afsd.cluster.peers import LayerStorePeer
from afsd.cluster.providers import (UNREACHABLE_CODES, ProviderUnusable, Provider, ProviderFailure, ProviderLease,
                                    rpc_failure)
from afsd.errors import DigestMismatchError, FetchError
from afsd.ondemand.spec import BlobSink, BlobSpec, FetchedRange, FetchedSpans, Filled, Priority
from afsd.retry import RetryPolicy
from afsd.rpc import ChannelPool

log = logging.getLogger(__name__)
T = TypeVar("T")

# One ReadLayer call reads at most this much (rounded down to whole chunks, at least one): big enough
# to stream at full speed, small enough that a big request spreads over concurrent calls and a call
# that stalls loses little.
PIECE_BYTES = 4 << 20
# A provider that failed is tried after all others for this long.
PROVIDER_COOLDOWN = 30.0
# A read goes over every provider; when all failed, it waits (the shared policy's jittered backoff),
# asks discovery again and makes one more round.
READ_RETRY = RetryPolicy(attempts=2, base=0.2, cap=1.0)
RELEASE_TIMEOUT = 2.0

class RangeFetcher:
    """Verified ranges of `spec`'s blob from the layerstores that hold it (an `afsd.ondemand.spec.RangeSource`).

    `fetch` returns whole chunks covering the request (at least `min_request` bytes, clipped to the
    blob) or raises FetchError naming the layer, the range and every provider's failure. Each ReadLayer
    call is abandoned after `call_timeout` seconds; a fetch makes at most `READ_RETRY.attempts` rounds over
    the providers, backing off between them.
    """

    def __init__(self, spec: BlobSpec, *, discovery: DiscoveryClient | None, channels: ChannelPool,
                 local_endpoint: str | None = None, node_id: str = "", call_timeout: float = 10.0,
                 min_request: int = 1 << 20, max_concurrency: int = 8, refresh_period: float = 30.0,
                 lease_ttl: float = 120.0, use_leases: bool = True, byte_stream: bool = True) -> None:
        if max_concurrency < 1 or call_timeout <= 0 or lease_ttl <= 0:
            raise ValueError("max_concurrency, call_timeout and lease_ttl must be positive")
        self.spec = spec
        self.discovery = discovery
        self.channels = channels
        self.local_endpoint = local_endpoint
        self.node_id = node_id
        self.call_timeout = call_timeout
        self.refresh_period = refresh_period
        self.lease_ttl = lease_ttl
        self.use_leases = use_leases
        self.byte_stream = byte_stream
        self._streams: dict[str, BlobByteStreams] = {}   # provider endpoint -> its byte stream of this blob
        self._table = spec.chunk_table()
        chunk = spec.chunk_size
        self._min_request = max(chunk, -(-min_request // chunk) * chunk)
        # shared by fetches and fills; PREFETCH pieces never take the last quarter of the slots
        self._gate = PriorityGate(max_concurrency, background=max_concurrency - max(1, max_concurrency // 4))
        self._flights = self._flight_table(self._read)
        self._fill_flights: weakref.WeakKeyDictionary[BlobSink, FlightTable[tuple[Delivery, Provider]]] = \
            weakref.WeakKeyDictionary()
        self._providers: dict[str, Provider] = {}
        self._other_blob: list[str] = []     # nodes holding the layer as another blob (last refresh)
        self._current: ProviderLease | None = None
        self._choose_lock = asyncio.Lock()
        self._refresh_task: asyncio.Task[None] | None = None
        self._refreshed_at = float("-inf")
        self._switcher: asyncio.Task[None] | None = None
        self._releases: set[asyncio.Task[None]] = set()
        self._closed = False
        self._counts = {"fetches": 0, "shared_fetches": 0, "read_calls": 0, "failovers": 0,
                        "verification_failures": 0, "errors": 0, "refreshes": 0}
        self._bytes = {"local": 0, "peer": 0}
        self._bytes_by_provider: dict[str, int] = {}
        self._calls_in_flight = 0
        self._set_candidates({}, set())

    # -- the RangeSource interface ------------------------------------------------------------------

    async def fetch(self, offset: int, length: int, priority: Priority = Priority.DEMAND) -> FetchedRange:
        start, end = self._widen(offset, length)
        started = time.monotonic()
        # The flights this fetch starts receive straight into its result; only the bytes of flights it joins
        # (started by another read) are copied in, once they landed. Per-flight buffers joined afterwards
        # cost a second allocation and copy of every byte: measured here, 1.4 vs 0.8 CPU s/GiB for 256 MiB.
        result = bytearray(end - start)
        whole = memoryview(result)
        flights, shared, results = await self._fly(
            self._flights, start, end, priority, read=lambda s, e: self._read(s, e, into=whole[s - start:e - start]))
        joined = [(flight, data) for flight, (data, _) in zip(flights, results) if data.obj is not result]
        if joined:
            await asyncio.to_thread(copy_joined, whole, start, end, joined)
        sources = "+".join(dict.fromkeys(provider.source for _, provider in results))
        return FetchedRange(start, result, sources, self._served(priority, started, shared))

    async def fill(self, offset: int, length: int, priority: Priority, sink: BlobSink) -> Filled:
        """Like `fetch`, but each verified piece goes into `sink` as it arrives (over the byte stream: from
        the connection's receive buffer, chunk by chunk), and nothing is returned but what was written."""
        start, end = self._widen(offset, length)
        started = time.monotonic()
        table = self._fill_flights.get(sink)
        if table is None:   # (one per sink: a blob file or cache file, filled for as long as it is open)
            table = self._fill_flights[sink] = self._flight_table(functools.partial(self._fill, weakref.ref(sink)))
        flights, shared, results = await self._fly(table, start, end, priority)
        written = sum(delivery.claim() for delivery, _ in results)
        sources = "+".join(dict.fromkeys(provider.source for _, provider in results))
        first, last = flights[0].start, flights[-1].end
        return Filled(first, last - first, written, sources, self._served(priority, started, shared))

    async def fetch_metadata(self, spans: Sequence[tuple[int, int]]) -> FetchedSpans:
        """The bytes of `spans` (covering every metadata range) as they are, from the best provider holding the
        layer only, checked against the metadata digest (metadata_reads.py); FetchError when that failed (the
        caller then reads whole chunks, with failover and a lease). No lease: the read is one round trip, a
        lease two more. A provider that lacks the layer or cannot be reached is skipped, as a lease refused."""
        errors: dict[str, str] = {}
        for provider in self._ranked(set()):
            try:
                data = await read_metadata(provider, self._byte_streams(provider), self.spec, spans, self.call_timeout)
            except ProviderUnusable as failure:
                self._provider_failed(provider, failure, errors, set(), "reading metadata")
                continue
            except (ProviderFailure, DigestMismatchError) as error:
                failure = error if isinstance(error, ProviderFailure) else ProviderFailure(str(error), retry=False)
                if isinstance(error, DigestMismatchError):
                    self._counts["verification_failures"] += 1
                    FETCH_METRICS.verification_failure()
                FETCH_METRICS.metadata_failure()
                self._provider_failed(provider, failure, {}, set(), "reading metadata")
                raise FetchError(f"reading the metadata of layer {self.spec.layer_digest} from {provider.label} "
                                 f"failed: {failure.reason}") from None
            self._count_bytes(provider, len(data))
            FETCH_METRICS.metadata_read(len(data))
            return FetchedSpans(tuple(spans), bytes(data), provider.source)
        raise FetchError(self._failure_message(spans[0][0], spans[-1][0] + spans[-1][1], errors))

    async def close(self) -> None:
        """Stop reading, cancel pieces in flight and release the lease (best effort)."""
        if self._closed:
            return
        self._closed = True
        tasks: list[asyncio.Task[Any]] = [*self._flights.tasks()]
        tasks += [task for table in list(self._fill_flights.values()) for task in table.tasks()]
        tasks += [t for t in (self._refresh_task, self._switcher) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._drop_current()
        await asyncio.gather(*self._releases, *(streams.close() for streams in self._streams.values()),
                             return_exceptions=True)

    def stats(self) -> dict[str, Any]:
        """Counters and the provider table, for status output and tests."""
        now = time.monotonic()
        current = self._current.provider if self._current is not None else None
        return {
            "layer": self.spec.layer_digest, "blob": self.spec.blob_digest,
            "provider": current.endpoint if current else None,
            "source": current.source if current else None,
            "lease": bool(self._current and self._current.lease_id),
            **self._counts, "bytes": dict(self._bytes),
            "bytes_by_provider": dict(self._bytes_by_provider),
            "calls_in_flight": self._calls_in_flight, "waiting": self._gate.waiting,
            "providers": [{"endpoint": p.endpoint, "node_id": p.node_id, "local": p.local,
                           "cooling_seconds": round(max(0.0, p.cooling_until - now), 3),
                           "last_error": p.last_error} for p in self._ranked(set())],
        }

    # -- requests and flights -----------------------------------------------------------------------

    def _widen(self, offset: int, length: int) -> tuple[int, int]:
        if offset < 0 or length <= 0 or offset >= self.spec.size:
            raise ValueError(f"range {offset}+{length} is outside layer {self.spec.layer_digest}'s blob "
                             f"of {self.spec.size} bytes")
        start, covered = self._table.widen(offset, length)
        return start, min(self.spec.size, start + max(covered, self._min_request))

    def _flight_table(self, read: Callable[[int, int], Awaitable[T]]) -> FlightTable[T]:
        chunk = self.spec.chunk_size
        return FlightTable(size=self.spec.size, chunk_size=chunk, piece_chunks=PIECE_BYTES // chunk, gate=self._gate,
                           read=read, label=self.spec.name[:12])

    async def _fly(self, table: FlightTable[T], start: int, end: int, priority: Priority, *,
                   read: Callable[[int, int], Awaitable[T]] | None = None) -> tuple[list[Flight[T]], bool, list[T]]:
        """The flights covering [start, end) (joined or started) and what each of them read."""
        if self._closed:
            raise FetchError(f"the fetcher for layer {self.spec.layer_digest} is closed")
        self._counts["fetches"] += 1
        self._maybe_refresh()
        flights, shared = table.cover(start, end, priority, read=read)
        if shared:
            self._counts["shared_fetches"] += 1
        try:
            return flights, shared, [await asyncio.shield(flight.task) for flight in flights]
        except FetchError:
            self._counts["errors"] += 1
            FETCH_METRICS.error()
            raise
        except asyncio.CancelledError:
            if self._closed:
                raise FetchError(f"the fetcher for layer {self.spec.layer_digest} was closed during a read") from None
            raise

    def _served(self, priority: Priority, started: float, shared: bool) -> dict[str, float]:
        elapsed = time.monotonic() - started
        FETCH_METRICS.fetch_served(priority.name.lower(), elapsed)
        return {"seconds": elapsed, "shared": float(shared)}

    async def _read(self, start: int, end: int, into: memoryview | None = None) -> tuple[memoryview, Provider]:
        """A flight of `fetch`: [start, end) into `into` (end - start bytes of the fetch's result) or a buffer
        of its own (the byte stream receives straight into it; the flight hands it on only once every byte
        of it was verified)."""
        buffer = memoryview(bytearray(end - start)) if into is None else into

        def deliver(offset: int, data: memoryview) -> None:
            if data.obj is not buffer.obj:   # (ReadLayer's bytes; the byte stream's are in place already)
                buffer[offset - start:offset - start + len(data)] = data

        return buffer, await self._read_with_failover(start, end, deliver, into=buffer)

    async def _fill(self, sink_ref: weakref.ref[BlobSink], start: int, end: int) -> tuple[Delivery, Provider]:
        """A flight of `fill`: [start, end) into the sink (referred to weakly by its flight table, so the
        table goes when the sink does; the fill that started this flight holds it)."""
        sink, delivery = sink_ref(), Delivery()
        if sink is None:
            raise FetchError("the sink of this fill is gone")

        def deliver(offset: int, data: memoryview) -> None:
            delivery.written += sink.write(offset, data)

        return delivery, await self._read_with_failover(start, end, deliver)

    # -- reading with failover ----------------------------------------------------------------------

    async def _read_with_failover(self, start: int, end: int, deliver: Deliver,
                                  into: memoryview | None = None) -> Provider:
        errors: dict[str, str] = {}
        definitive: set[str] = set()   # not worth another try within this read
        async for round_ in READ_RETRY.rounds():
            if round_ > 1:
                await self._refresh_now()  # every known provider failed: ask discovery, then once more
            tried = set(definitive)
            while (provider := await self._choose(tried, errors, definitive)) is not None:
                tried.add(provider.endpoint)
                try:
                    await self._read_once(provider, start, end, deliver, into)
                    return provider
                except ProviderFailure as failure:
                    self._provider_failed(provider, failure, errors, definitive, f"reading bytes {start}-{end}")
        raise FetchError(self._failure_message(start, end, errors))

    async def _read_once(self, provider: Provider, start: int, end: int, deliver: Deliver,
                         into: memoryview | None = None) -> None:
        """[start, end) from `provider`, checked against the chunk table and handed to `deliver` (in a
        thread): over its byte stream when it offers one (received straight into `into` if given), else
        with one ReadLayer call."""
        if await self._read_streamed(provider, start, end, deliver, into):
            self._count_bytes(provider, end - start)
            return
        length = end - start
        self._counts["read_calls"] += 1
        self._calls_in_flight += 1
        call = provider.peer.stub.ReadLayer(
            pb.ReadLayerRequest(digest=self.spec.layer_digest, offset=start, length=length), timeout=self.call_timeout)
        parts: list[bytes] = []
        received = 0
        try:
            # gRPC's deadline should end the call; this also bounds anything else that could stall.
            async with asyncio.timeout(self.call_timeout):
                async for message in call:
                    if message.offset != start + received or received + len(message.data) > length:
                        raise ProviderFailure(
                            f"sent {len(message.data)} bytes at {message.offset} after {received} of {length} "
                            f"bytes from {start}", retry=False)
                    if message.data:
                        parts.append(message.data)
                        received += len(message.data)
        except TimeoutError:
            raise ProviderFailure(f"ReadLayer sent {received} of {length} bytes within {self.call_timeout:g} s",
                                   retry=False) from None
        except grpc.aio.AioRpcError as error:
            raise rpc_failure(error, "ReadLayer", self.call_timeout) from None
        finally:
            self._calls_in_flight -= 1
            if not call.done():
                call.cancel()
        if received != length:
            raise ProviderFailure(f"short read: {received} of {length} bytes from {start}", retry=False)
        try:
            await asyncio.to_thread(self._check_and_deliver, parts, start, provider.label, deliver)
        except DigestMismatchError as error:
            self._counts["verification_failures"] += 1
            FETCH_METRICS.verification_failure()
            raise ProviderFailure(str(error), retry=False) from None
        self._count_bytes(provider, length)

    async def _read_streamed(self, provider: Provider, start: int, end: int, deliver: Deliver,
                             into: memoryview | None) -> bool:
        """[start, end) over `provider`'s byte stream, verified, to `deliver`; False when it offers no usable one."""
        streams = self._byte_streams(provider)
        if streams is None or not streams.usable:
            return False
        self._counts["read_calls"] += 1
        self._calls_in_flight += 1
        try:
            await streams.read(start, end, self.call_timeout, deliver, into)
            return True
        except ByteStreamUnavailable:
            self._counts["read_calls"] -= 1   # nothing was read: the ReadLayer call that follows counts
            return False
        except DigestMismatchError as error:
            self._counts["verification_failures"] += 1
            FETCH_METRICS.verification_failure()
            raise ProviderFailure(str(error), retry=False) from None
        except ByteStreamError as error:
            raise ProviderFailure(str(error), retry=False) from None
        except grpc.aio.AioRpcError as error:
            raise rpc_failure(error, "OpenByteStream", self.call_timeout) from None
        finally:
            self._calls_in_flight -= 1

    def _byte_streams(self, provider: Provider) -> BlobByteStreams | None:
        """`provider`'s byte stream of this blob (None with `byte_stream=False`)."""
        streams = self._streams.get(provider.endpoint)
        if streams is None and self.byte_stream:
            streams = self._streams[provider.endpoint] = BlobByteStreams(
                provider.endpoint, provider.peer.stub, self.spec.layer_digest, self._table, tls=self.channels.data_tls)
        return streams

    def _count_bytes(self, provider: Provider, length: int) -> None:
        kind = "local" if provider.local else "peer"
        self._bytes_by_provider[provider.endpoint] = self._bytes_by_provider.get(provider.endpoint, 0) + length
        self._bytes[kind] += length
        FETCH_METRICS.bytes_read(kind, length)

    def _check_and_deliver(self, parts: list[bytes], start: int, source: str, deliver: Deliver) -> None:
        data = parts[0] if len(parts) == 1 else b"".join(parts)
        self._table.check(start, data, source=source)
        deliver(start, memoryview(data))

    def _provider_failed(self, provider: Provider, failure: ProviderFailure, errors: dict[str, str],
                         definitive: set[str], doing: str) -> None:
        errors[provider.label] = failure.reason
        if not failure.retry:
            definitive.add(provider.endpoint)
        self._counts["failovers"] += 1
        FETCH_METRICS.failover()
        log.warning("layer %s: provider %s failed %s: %s; failing over", self.spec.layer_digest, provider.label,
                    doing, failure.reason)
        self._cool_down(provider, failure.reason)

    def _cool_down(self, provider: Provider, reason: str) -> None:
        provider.cooling_until = time.monotonic() + PROVIDER_COOLDOWN
        provider.last_error = reason
        if self._current is not None and self._current.provider is provider:
            self._drop_current()

    def _failure_message(self, start: int, end: int, errors: dict[str, str]) -> str:
        what = f"bytes {start}-{end} of layer {self.spec.layer_digest} (blob {self.spec.blob_digest})"
        if errors:
            return f"cannot fetch {what}: every layerstore failed: " + "; ".join(
                f"{label}: {reason}" for label, reason in errors.items())
        if self._other_blob:
            where = (f"{', '.join(self._other_blob)} hold(s) the layer converted to another blob "
                     "(a different converter); convert it with this one or refresh the spec")
        elif self.discovery is not None:
            where = f"discovery ({', '.join(self.discovery.endpoints)}) lists no holder"
        else:
            where = "no providers were given and there is no discovery"
        return f"cannot fetch {what}: no layerstore holds it; {where}"

    # -- choosing a provider, with its lease ----------------------------------------------------------

    def _ranked(self, exclude: set[str]) -> list[Provider]:
        now = time.monotonic()
        current = self._current.provider if self._current is not None else None
        return sorted((p for p in self._providers.values() if p.endpoint not in exclude),
                      key=lambda p: (p.cooling_until > now, not p.local, p is not current, p.order))

    async def _choose(self, tried: set[str], errors: dict[str, str], definitive: set[str]) -> Provider | None:
        """The best provider not in `tried`, leased; None when none is left. Lease failures count as
        that provider's failure for this read."""
        async with self._choose_lock:
            while True:
                ranked = self._ranked(tried)
                if not ranked:
                    return None
                best = ranked[0]
                if self._current is not None and self._current.provider is best:
                    return best
                try:
                    await self._adopt(best)
                    return best
                except ProviderFailure as failure:
                    tried.add(best.endpoint)
                    self._provider_failed(best, failure, errors, definitive, "to lease the layer")

    async def _adopt(self, provider: Provider) -> None:
        lease_id = None
        if self.use_leases and provider.leases_supported:
            request = pb.AcquireLayerLeaseRequest(digests=[self.spec.layer_digest], ttl_ms=int(self.lease_ttl * 1000))
            try:
                response = await provider.peer.stub.AcquireLayerLease(request, timeout=self.call_timeout)
                lease_id = response.lease_id
            except grpc.aio.AioRpcError as error:
                code = error.code()
                if code in UNREACHABLE_CODES:
                    raise rpc_failure(error, "AcquireLayerLease", self.call_timeout) from None
                # Leases are best effort: a layerstore that has the layer but cannot lease it is read anyway.
                if code == grpc.StatusCode.UNIMPLEMENTED:
                    provider.leases_supported = False
                log.info("layerstore %s gave no lease (%s %s); reading without", provider.label, code.name,
                         error.details())
        renewer = asyncio.create_task(self._renew(provider, lease_id)) if lease_id else None
        previous, self._current = self._current, ProviderLease(provider, lease_id, renewer)
        if previous is not None:
            self._drop_lease(previous)
        log.info("layer %s: reading from %s (%s, %s)", self.spec.layer_digest, provider.label,
                 "local" if provider.local else "peer", "leased" if lease_id else "no lease")

    async def _renew(self, provider: Provider, lease_id: str) -> None:
        request = pb.RenewLayerLeaseRequest(lease_id=lease_id, ttl_ms=int(self.lease_ttl * 1000))
        while True:
            await asyncio.sleep(self.lease_ttl / 4)
            try:
                await provider.peer.stub.RenewLayerLease(request, timeout=self.call_timeout)
            except grpc.aio.AioRpcError as error:
                reason = f"lease renewal failed: {error.code().name} {error.details()}"
                log.warning("layer %s: %s on %s; switching provider", self.spec.layer_digest, reason, provider.label)
                self._counts["failovers"] += 1
                FETCH_METRICS.failover()
                self._cool_down(provider, reason)
                if not self._closed and self._switcher is None:
                    self._switcher = asyncio.create_task(self._switch_after_lease_loss())
                return

    async def _switch_after_lease_loss(self) -> None:
        """Lease another holder now, so the layer stays pinned somewhere while the mount is idle."""
        try:
            if self._current is None:
                await self._choose(set(), {}, set())
        finally:
            self._switcher = None

    def _drop_current(self) -> None:
        if self._current is not None:
            lease, self._current = self._current, None
            self._drop_lease(lease)

    def _drop_lease(self, lease: ProviderLease) -> None:
        """Stop renewing and release in the background; close() waits for these tasks."""
        tasks = []
        if lease.renewer is not None and not lease.renewer.done():
            lease.renewer.cancel()
            tasks.append(lease.renewer)
        if lease.lease_id:
            tasks.append(asyncio.create_task(self._release(lease.provider, lease.lease_id)))
        for task in tasks:
            self._releases.add(task)
            task.add_done_callback(self._releases.discard)

    async def _release(self, provider: Provider, lease_id: str) -> None:
        try:
            await provider.peer.stub.ReleaseLayerLease(pb.ReleaseLayerLeaseRequest(lease_id=lease_id),
                                                       timeout=min(self.call_timeout, RELEASE_TIMEOUT))
        except grpc.aio.AioRpcError as error:  # the lease expires by itself
            log.info("releasing lease %s on %s failed: %s", lease_id, provider.label, error.code().name)

    # -- the provider list ----------------------------------------------------------------------------

    def _maybe_refresh(self) -> None:
        if (self.discovery is not None and self._refresh_task is None
                and time.monotonic() - self._refreshed_at >= self.refresh_period):
            self._start_refresh()

    def _start_refresh(self) -> asyncio.Task[None]:
        task = self._refresh_task = asyncio.create_task(self._refresh())

        def done(_: asyncio.Task[None]) -> None:
            if self._refresh_task is task:
                self._refresh_task = None

        task.add_done_callback(done)
        return task

    async def _refresh_now(self) -> None:
        if self.discovery is not None:
            await asyncio.shield(self._refresh_task or self._start_refresh())

    async def _refresh(self) -> None:
        if self.discovery is None:
            return
        digest = self.spec.layer_digest
        try:
            services = await self.discovery.find_provider(digest, requester=self.local_endpoint or "")
        except (DiscoveryUnavailableError, grpc.aio.AioRpcError) as error:
            log.warning("layer %s: cannot refresh providers from discovery: %s", digest, error)
            return
        finally:
            self._refreshed_at = time.monotonic()
        self._counts["refreshes"] += 1
        matching: dict[str, str] = {}
        excluded: set[str] = set()
        self._other_blob = []
        for service in services:
            stat = next((s for s in service.layer_stats if s.digest == digest), None)
            if stat is not None and stat.blob_digest == self.spec.blob_digest:
                matching[service.endpoint] = service.node_id
                continue
            excluded.add(service.endpoint)  # other bytes, or it does not say which: never mixed in
            if stat is not None:
                self._other_blob.append(f"{service.endpoint} ({service.node_id})")
        self._set_candidates(matching, excluded)

    def _set_candidates(self, found: dict[str, str], excluded: set[str]) -> None:
        """Providers := spec.providers + `found`, minus `excluded` (nodes that discovery says hold another
        blob). A provider that disappears is dropped (and its lease released); the others keep their state."""
        wanted = {endpoint: "" for endpoint in self.spec.providers if endpoint not in excluded}
        wanted.update(found)
        for endpoint in [e for e in self._providers if e not in wanted]:
            provider = self._providers.pop(endpoint)
            if self._current is not None and self._current.provider is provider:
                self._drop_current()
            log.info("layer %s: %s no longer listed as a provider", self.spec.layer_digest, provider.label)
        for endpoint, node_id in wanted.items():
            provider = self._providers.get(endpoint)
            if provider is None:
                self._providers[endpoint] = Provider(
                    endpoint, node_id, self._is_local(endpoint, node_id), LayerStorePeer(endpoint, self.channels),
                    random.random())
            elif node_id and not provider.node_id:
                provider.node_id = node_id
                provider.local = self._is_local(endpoint, node_id)

    def _is_local(self, endpoint: str, node_id: str) -> bool:
        return endpoint == self.local_endpoint or bool(self.node_id and node_id == self.node_id)
