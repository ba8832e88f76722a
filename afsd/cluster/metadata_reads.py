"""A blob's metadata read from one provider as it is, and checked against the blob's metadata digest.

Where it sits: before a fanotify mount, the node must hold every metadata byte of the blob
(afsd/ondemand/fanotify/blobfile.py). The chunk table can only check them by whole chunks, which for a
Debian + python3 layer means 90 MiB for 0.8 MiB of metadata; the signed metadata digest
(afsd/ondemand/metadata.py) checks exactly those bytes. So `RangeFetcher.fetch_metadata` reads the spans
the prefill asks for from ONE provider with `read_metadata`: over its byte stream, every request sent at
once (one round trip), else one `ReadLayer` call per span, all in flight together; then hashes the
metadata bytes in a thread. Anything wrong (an unreachable provider, a short or forged answer) raises,
and the prefill falls back to whole verified chunks, which fail over between providers: a hostile
provider costs time, never correctness.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Sequence

import grpc

from afsd import phases
from afsd.cluster.bytestream_client import BlobByteStreams, ByteStreamError, ByteStreamUnavailable
from afsd.cluster.providers import Provider, ProviderFailure, rpc_failure
from afsd.errors import DigestMismatchError
from afsd.ondemand.metadata import check_metadata
from afsd.ondemand.spec import BlobSpec

# ReadLayer calls of one metadata read in flight at once (a peer without a byte stream).
READLAYER_CALLS = 16


async def read_metadata(provider: Provider, streams: BlobByteStreams | None, spec: BlobSpec,
                        spans: Sequence[tuple[int, int]], timeout: float) -> bytearray:
    """The bytes of `spans` (ascending, covering every metadata range of `spec`'s blob) from `provider`, back
    to back, checked against `spec.metadata_digest`, within `timeout`. Raises DigestMismatchError for
    bytes that do not match, ProviderFailure when the provider could not answer."""
    data = None
    if streams is not None and streams.usable:
        try:
            data = await streams.read_spans(spans, timeout)
        except ByteStreamUnavailable:
            pass
        except ByteStreamError as error:
            raise ProviderFailure(str(error), retry=False) from None
        except grpc.aio.AioRpcError as error:
            raise rpc_failure(error, "OpenByteStream", timeout) from None
    if data is None:
        data = await _read_layer_spans(provider, spec.layer_digest, spans, timeout)
    with phases.phase("metadata.verify"):
        await asyncio.to_thread(check_metadata, spec.metadata_ranges(), spec.metadata_digest, spans, memoryview(data),
                                source=f"layerstore {provider.label}")
    return data


async def _read_layer_spans(provider: Provider, layer_digest: str, spans: Sequence[tuple[int, int]],
                            timeout: float) -> bytearray:
    """The bytes of `spans` with one ReadLayer call each, `READLAYER_CALLS` at a time."""
    into = bytearray(sum(length for _, length in spans))
    slots = asyncio.Semaphore(READLAYER_CALLS)

    async def read(at: int, offset: int, length: int) -> None:
        async with slots:
            received = 0
            async for _, data in provider.peer.read_stream(layer_digest, offset, length, timeout):
                if received + len(data) > length:
                    raise DigestMismatchError(f"layerstore {provider.label} sent more than the {length} bytes "
                                              f"asked for at {offset}")
                into[at + received:at + received + len(data)] = data
                received += len(data)
            if received != length:
                raise ProviderFailure(f"short read: {received} of {length} bytes from {offset}", retry=False)

    starts = itertools.accumulate((length for _, length in spans), initial=0)   # where each span goes in `into`
    try:
        async with asyncio.timeout(timeout):
            async with asyncio.TaskGroup() as group:
                for at, (offset, length) in zip(starts, spans):
                    group.create_task(read(at, offset, length))
    except TimeoutError:
        raise ProviderFailure(f"ReadLayer did not send {len(spans)} spans within {timeout:g} s", retry=False) from None
    except BaseExceptionGroup as failures:
        failure = failures.exceptions[0]
        if isinstance(failure, grpc.aio.AioRpcError):
            raise rpc_failure(failure, "ReadLayer", timeout) from None
        raise failure from None
    return into
