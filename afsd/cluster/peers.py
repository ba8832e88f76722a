"""Reading from peer layerstores: a typed client for `layerstore.v1.LayerStore`, and whole-blob copies
verified chunk by chunk.

A copy reads the whole blob over the peer's byte stream (bytestream_client.py: sendfile on the other side)
or, from a peer without one, with one `ReadLayer` call; it checks each chunk against the chunk table the
peer published in `StatLayer` and the whole file against the blob digest, and writes to a partial file
that the caller publishes only after every check passed.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from afsd.api import layerstore_pb2 as pb
from afsd.api import layerstore_pb2_grpc as pb_grpc
from afsd.cluster.bytestream_client import BlobByteStreams, ByteStreamError, ByteStreamUnavailable
from afsd.cluster.peer_answers import check_stat
from afsd.erofs.convert import BlobInfo
from afsd.errors import DigestMismatchError
from afsd.ondemand.chunks import ChunkTable
from afsd.ondemand.metadata import MetadataHasher, metadata_ranges
from afsd.ondemand.sparse import write_at
from afsd.ondemand.spec import BlobSpec
from afsd.rpc import ChannelPool

if TYPE_CHECKING:
    from afsd.trust.descriptors import BlobTrust

log = logging.getLogger(__name__)

# Data per ReadLayer message: 64 KiB under gRPC's default 4 MiB receive limit leaves room for framing.
MAX_READ_MESSAGE = 4 * 1024 * 1024 - 64 * 1024
# A whole-blob copy over the byte stream asks for this much per request, each within the timeout (a
# stalled sender is cut off sooner by the server's own send deadline).
COPY_PIECE_BYTES = 64 << 20
COPY_PIECE_TIMEOUT = 600.0


@dataclass(frozen=True)
class PeerLayer:
    """What a peer's StatLayer says about a layer it holds."""

    digest: str
    media_type: str
    compressed_size: int
    blob: BlobInfo
    descriptor: pb.SignedBlobDescriptor = field(default_factory=pb.SignedBlobDescriptor)  # kept with copies

    @property
    def chunks(self) -> ChunkTable:
        return ChunkTable(self.blob.size, self.blob.chunk_size, tuple(self.blob.chunk_digests))


class BlobHashes:
    """A blob's two digests taken over its bytes, handed over in ascending order: the whole file's and its
    metadata's (afsd/ondemand/metadata.py); `check` compares them with what `blob` publishes."""

    def __init__(self, blob: BlobInfo) -> None:
        self._blob = blob
        self._whole = hashlib.sha256()
        self._metadata = MetadataHasher(metadata_ranges(blob.size, blob.data_map))

    def update(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        self._whole.update(data)
        self._metadata.update(offset, data)

    def check(self, source: str) -> None:
        """DigestMismatchError naming `source` unless the bytes are the blob (and its metadata, when the
        blob has a metadata digest)."""
        digest = "sha256:" + self._whole.hexdigest()
        if digest != self._blob.digest:
            raise DigestMismatchError(f"{source} does not match blob digest {self._blob.digest}: it hashes to {digest}")
        if not self._blob.metadata_digest:
            return
        try:
            metadata = self._metadata.hexdigest()
        except ValueError as error:   # (only if the whole matched a blob whose published data map is wrong)
            raise DigestMismatchError(f"{source}: {error}") from None
        if metadata != self._blob.metadata_digest:
            raise DigestMismatchError(
                f"{source}: its metadata does not match metadata digest {self._blob.metadata_digest}")


def stat_to_peer_layer(stat: pb.StatLayerResponse) -> PeerLayer:
    blob = BlobInfo(blob_id=stat.blob_id, layer_digest=stat.digest, diff_id=stat.diff_id,
                    size=stat.afs_size, digest=stat.blob_digest,
                    data_map=[(r.offset, r.length) for r in stat.data_map],
                    chunk_size=stat.chunk_size, chunk_digests=list(stat.chunk_digests),
                    converter=stat.converter, implicit_dirs=list(stat.implicit_dirs),
                    metadata_digest=stat.metadata_digest)
    return PeerLayer(stat.digest, stat.media_type, stat.compressed_size, blob, stat.descriptor)


def blob_spec_from_stat(stat: pb.StatLayerResponse, providers: tuple[str, ...] = ()) -> BlobSpec:
    """What a mount needs to know about a layer's blob, from a provider's StatLayer answer."""
    return BlobSpec(layer_digest=stat.digest, blob_digest=stat.blob_digest, size=stat.afs_size,
                    chunk_size=stat.chunk_size, chunk_digests=tuple(stat.chunk_digests),
                    data_map=tuple((r.offset, r.length) for r in stat.data_map),
                    implicit_dirs=tuple(stat.implicit_dirs), providers=providers, media_type=stat.media_type,
                    compressed_size=stat.compressed_size, diff_id=stat.diff_id, blob_id=stat.blob_id,
                    converter=stat.converter, descriptor=stat.descriptor.SerializeToString(),
                    metadata_digest=stat.metadata_digest)


def stat_from_blob_spec(spec: BlobSpec) -> pb.StatLayerResponse:
    """The inverse of `blob_spec_from_stat` (without the cache path, which is per node)."""
    return pb.StatLayerResponse(
        digest=spec.layer_digest, afs_size=spec.size, blob_digest=spec.blob_digest,
        data_map=[pb.ByteRange(offset=o, length=n) for o, n in spec.data_map], chunk_size=spec.chunk_size,
        chunk_digests=list(spec.chunk_digests), converter=spec.converter, blob_id=spec.blob_id,
        diff_id=spec.diff_id, media_type=spec.media_type, compressed_size=spec.compressed_size,
        implicit_dirs=list(spec.implicit_dirs), descriptor=pb.SignedBlobDescriptor.FromString(spec.descriptor),
        metadata_digest=spec.metadata_digest)


class LayerStorePeer:
    """A client of one layerstore, over a shared channel."""

    def __init__(self, endpoint: str, channels: ChannelPool) -> None:
        self.endpoint = endpoint
        self.stub = pb_grpc.LayerStoreStub(channels.get(endpoint))

    async def stat_layer(self, digest: str, *, diff_id: str | None = None, trust: BlobTrust | None = None,
                         timeout: float = 10.0) -> pb.StatLayerResponse:
        """The peer's description of layer `digest`'s blob, checked for form and bounds, to be about that
        layer and (given `diff_id`) made from that tar, and (given `trust`) to be exactly what the
        converter's signed descriptor attests; PeerAnswerError naming the peer otherwise."""
        answer = await self.stub.StatLayer(pb.StatLayerRequest(digest=digest), timeout=timeout)
        peer = f"layerstore {self.endpoint}"
        check_stat(answer, digest, peer=peer, diff_id=diff_id)
        if trust is not None:
            trust.verified_descriptor(answer, digest, peer=peer, diff_id=diff_id)
        return answer

    async def stat(self, digest: str, *, diff_id: str | None = None, trust: BlobTrust | None = None,
                   timeout: float = 10.0) -> PeerLayer:
        return stat_to_peer_layer(await self.stat_layer(digest, diff_id=diff_id, trust=trust, timeout=timeout))

    async def read_stream(self, digest: str, offset: int, length: int,
                          timeout: float | None = None) -> AsyncIterator[tuple[int, bytes]]:
        """Yield (offset, data) pieces of [offset, offset+length), stopping early at the blob's end."""
        call = self.stub.ReadLayer(pb.ReadLayerRequest(digest=digest, offset=offset, length=length), timeout=timeout)
        expected = offset
        async for message in call:
            if message.offset != expected:
                call.cancel()
                raise DigestMismatchError(f"peer {self.endpoint} sent bytes at {message.offset}, expected {expected}")
            if message.data:
                yield message.offset, message.data
                expected += len(message.data)
            if message.eof:
                break

    async def read(self, digest: str, offset: int, length: int, timeout: float | None = None) -> bytes:
        parts = [data async for _, data in self.read_stream(digest, offset, length, timeout)]
        return b"".join(parts)

    async def ensure_layers(self, request: pb.EnsureLayersRequest, timeout: float | None = None) -> pb.EnsureLayersResponse:
        return await self.stub.EnsureLayers(request, timeout=timeout)


class _VerifyingWriter:
    """Collects streamed bytes into whole chunks, checks each, and writes it at its offset (in a thread)."""

    def __init__(self, fd: int, layer: PeerLayer, source: str) -> None:
        self._fd = fd
        self._table = layer.chunks
        self._source = source
        self.hashes = BlobHashes(layer.blob)
        self._buffer = bytearray()
        self._offset = 0

    def _flush_chunk(self, data: bytes) -> None:
        self._table.check(self._offset, data, source=self._source)
        self.hashes.update(self._offset, data)
        os.pwrite(self._fd, data, self._offset)
        self._offset += len(data)

    async def add(self, data: bytes) -> None:
        self._buffer += data
        chunk = self._table.chunk_size
        while len(self._buffer) >= chunk:
            piece = bytes(self._buffer[:chunk])
            del self._buffer[:chunk]
            await asyncio.to_thread(self._flush_chunk, piece)

    async def finish(self) -> BlobHashes:
        if self._buffer:
            await asyncio.to_thread(self._flush_chunk, bytes(self._buffer))
            self._buffer.clear()
        if self._offset != self._table.size:
            raise DigestMismatchError(f"{self._source} ended after {self._offset} of {self._table.size} bytes")
        await asyncio.to_thread(os.fsync, self._fd)
        return self.hashes


async def copy_layer(peer: LayerStorePeer, layer: PeerLayer, dest: Path, *,
                     data_tls: ssl.SSLContext | None = None) -> int:
    """Copy `layer`'s blob from `peer` into `dest`, verified; return the bytes copied. Over the peer's
    byte stream when it offers one (`data_tls`: for a data listener that speaks TLS), else (or when the
    stream fails midway) with one ReadLayer call.

    On any mismatch (the blob's digest, or its metadata digest when it has one) `dest` is removed and
    DigestMismatchError names the peer.
    """
    source = f"layerstore {peer.endpoint} (layer {layer.digest})"
    fd = await asyncio.to_thread(os.open, dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        hashes = await _copy_streamed(peer, layer, fd, data_tls)
        if hashes is None:
            await asyncio.to_thread(os.ftruncate, fd, 0)
            writer = _VerifyingWriter(fd, layer, source)
            async for _, data in peer.read_stream(layer.digest, 0, layer.blob.size):
                await writer.add(data)
            hashes = await writer.finish()
        hashes.check(source)
    except BaseException:
        await asyncio.to_thread(_close_and_remove, fd, dest)
        raise
    await asyncio.to_thread(os.close, fd)
    return layer.blob.size


async def _copy_streamed(peer: LayerStorePeer, layer: PeerLayer, fd: int,
                         data_tls: ssl.SSLContext | None) -> BlobHashes | None:
    """The blob over the peer's byte stream into `fd` (each chunk checked as it arrives, the whole and its
    metadata hashed in order), fsynced; its hashes, or None when the stream is unusable or failed (read it
    with ReadLayer)."""
    streams = BlobByteStreams(peer.endpoint, peer.stub, layer.digest, layer.chunks, tls=data_tls)
    hashes = BlobHashes(layer.blob)

    def deliver(offset: int, data: memoryview) -> None:   # (in order: one connection, one piece at a time)
        hashes.update(offset, data)
        write_at(fd, data, offset)

    size = layer.blob.size
    try:
        for start in range(0, size, COPY_PIECE_BYTES):
            await streams.read(start, min(size, start + COPY_PIECE_BYTES), COPY_PIECE_TIMEOUT, deliver)
    except (ByteStreamUnavailable, ByteStreamError) as error:
        log.info("copying %s from %s with ReadLayer: %s", layer.digest, peer.endpoint, error)
        return None
    finally:
        await streams.close()
    await asyncio.to_thread(os.fsync, fd)
    return hashes


def _close_and_remove(fd: int, path: Path) -> None:
    os.close(fd)
    path.unlink(missing_ok=True)

