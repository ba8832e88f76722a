"""The layerstore's on-disk cache of erofs blobs, with its size limit, reservations, leases and LRU.

Layout under the cache root:

    layers/sha256/<hex>.erofs    the blob converted from registry layer sha256:<hex>
    layers/sha256/<hex>.json     its description (BlobInfo + media type + compressed size + the
                                 converter's signed descriptor, afsd/trust/descriptors.py)
    images/<sha256 of key>.json  an image pulled here: key, reference, manifest digest, layer list
    tmp/                         partial downloads and conversions; emptied at startup

A blob is published by renaming a complete, fsynced file into place and then writing its description
atomically, so after a crash a blob either has a description (and is served) or is deleted at startup.
Recency for LRU is the blob file's mtime, bumped on use, so it survives restarts.

Accounting: the limit covers blobs on disk plus outstanding reservations. A pull reserves an estimate
of what it will add before downloading anything; eviction removes least recently used blobs that are
neither leased nor protected by the caller. All bookkeeping happens on the event loop (no locks);
file deletions and scans run in threads.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import itertools
import json
import logging
import os
import shutil
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from afsd.api import layerstore_pb2 as pb
from afsd.erofs.convert import BlobInfo
from afsd.errors import CacheFullError
from afsd.fsutil import write_json_atomically

log = logging.getLogger(__name__)

TIB = 1 << 40
DEFAULT_LEASE_TTL = 120.0
MAX_LEASE_TTL = 600.0  # a peer asking for more gets this: a lease is renewed, never a way to pin forever


@dataclass
class StoredLayer:
    digest: str
    media_type: str
    compressed_size: int
    blob: BlobInfo
    path: Path
    last_used: float
    descriptor: bytes = b""   # the converter's SignedBlobDescriptor, serialized (empty in dev mode)

    def to_json(self) -> dict[str, Any]:
        return {"digest": self.digest, "media_type": self.media_type,
                "compressed_size": self.compressed_size, "blob": self.blob.to_json(),
                "descriptor": base64.b64encode(self.descriptor).decode()}

    def to_stat(self) -> pb.StatLayerResponse:
        """This layer as StatLayer describes it, with the converter's signed descriptor."""
        blob = self.blob
        return pb.StatLayerResponse(
            digest=self.digest, afs_size=blob.size, cache_path=str(self.path), blob_digest=blob.digest,
            data_map=[pb.ByteRange(offset=o, length=n) for o, n in blob.data_map], chunk_size=blob.chunk_size,
            chunk_digests=blob.chunk_digests, converter=blob.converter, blob_id=blob.blob_id, diff_id=blob.diff_id,
            media_type=self.media_type, compressed_size=self.compressed_size, implicit_dirs=blob.implicit_dirs,
            descriptor=pb.SignedBlobDescriptor.FromString(self.descriptor), metadata_digest=blob.metadata_digest)


@dataclass
class Reservation:
    """Space promised to one pull until it finishes; shrinks as its layers land on disk."""

    remaining: int
    protected: frozenset[str]


@dataclass
class Lease:
    lease_id: str
    digests: tuple[str, ...]
    expires_at: float  # wall clock


@dataclass
class PruneResult:
    before: int
    after: int
    reclaimed: int
    evicted: list[str] = field(default_factory=list)


def default_cache_limit(root: Path) -> int:
    """min(1 TiB, 60 % of the free space of the cache filesystem), measured now."""
    stats = os.statvfs(root)
    return min(TIB, int(stats.f_bavail * stats.f_frsize * 0.6))


def _hex(digest: str) -> str:
    algorithm, _, hexpart = digest.partition(":")
    if algorithm != "sha256" or len(hexpart) != 64:
        raise ValueError(f"not a sha256 digest: {digest!r}")
    return hexpart


class BlobStore:
    def __init__(self, root: Path, limit: int | None = None) -> None:
        self.root = root
        self.layers_dir = root / "layers" / "sha256"
        self.images_dir = root / "images"
        self.tmp_dir = root / "tmp"
        self._limit = limit
        self._layers: dict[str, StoredLayer] = {}
        self._reservations: list[Reservation] = []
        self._leases: dict[str, Lease] = {}
        self._lease_ids = itertools.count(1)
        self._reserving = asyncio.Lock()   # check-evict-reserve is one step: no two pulls get the same room
        self.evictions = 0

    # -- startup --------------------------------------------------------------------------------

    async def open(self) -> None:
        """Create the layout, drop leftovers of a crash, and load what is on disk."""
        loaded = await asyncio.to_thread(self._scan)
        self._layers = {layer.digest: layer for layer in loaded}
        if self._limit is None:
            self._limit = await asyncio.to_thread(default_cache_limit, self.root)

    def _scan(self) -> list[StoredLayer]:
        for directory in (self.layers_dir, self.images_dir):
            directory.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(self.tmp_dir, ignore_errors=True)
        self.tmp_dir.mkdir(parents=True)
        found: list[StoredLayer] = []
        for entry in os.scandir(self.layers_dir):
            name = entry.name
            path = Path(entry.path)
            if name.endswith(".partial"):
                path.unlink(missing_ok=True)
            elif name.endswith(".erofs"):
                layer = self._load_layer(path)
                if layer is None:
                    log.warning("removing %s: no valid description (left by a crash?)", path)
                    path.unlink(missing_ok=True)
                    path.with_suffix(".json").unlink(missing_ok=True)
                else:
                    found.append(layer)
            elif name.endswith(".json") and not path.with_suffix(".erofs").exists():
                path.unlink(missing_ok=True)
        return found

    @staticmethod
    def _load_layer(path: Path) -> StoredLayer | None:
        try:
            document = json.loads(path.with_suffix(".json").read_text())
            blob = BlobInfo.from_json(document["blob"])
            stat = path.stat()
        except (OSError, ValueError, KeyError, TypeError):
            return None
        if stat.st_size != blob.size or _hex(document["digest"]) != path.stem:
            return None
        return StoredLayer(document["digest"], document["media_type"], int(document["compressed_size"]),
                           blob, path, stat.st_mtime, base64.b64decode(document.get("descriptor", "")))

    # -- lookups --------------------------------------------------------------------------------

    @property
    def limit(self) -> int:
        assert self._limit is not None, "BlobStore.open() first"
        return self._limit

    def get(self, digest: str) -> StoredLayer | None:
        return self._layers.get(digest)

    def layers(self) -> list[StoredLayer]:
        return list(self._layers.values())

    def usage(self) -> int:
        return sum(layer.blob.size for layer in self._layers.values())

    def reserved(self) -> int:
        return sum(r.remaining for r in self._reservations)

    def available(self) -> int:
        return self.limit - self.usage() - self.reserved()

    def path_for(self, digest: str) -> Path:
        return self.layers_dir / f"{_hex(digest)}.erofs"

    def new_partial(self, digest: str) -> Path:
        return self.tmp_dir / f"{_hex(digest)}.{os.urandom(6).hex()}.partial"

    def touch(self, digest: str) -> None:
        """Mark a layer as just used (LRU); the file's mtime carries it across restarts."""
        layer = self._layers.get(digest)
        if layer is None:
            return
        now = time.time()
        if now - layer.last_used > 1.0:  # one utime per second per layer is plenty for LRU
            layer.last_used = now
            asyncio.get_running_loop().run_in_executor(None, _bump_mtime, layer.path, now)

    # -- publishing and removal -----------------------------------------------------------------

    async def commit(self, digest: str, media_type: str, compressed_size: int, blob: BlobInfo,
                     partial: Path, reservation: Reservation | None = None,
                     estimate: int = 0, descriptor: bytes = b"") -> StoredLayer:
        """Move a complete, verified blob into the cache and describe it."""
        path = self.path_for(digest)
        layer = StoredLayer(digest, media_type, compressed_size, blob, path, time.time(), descriptor)

        def publish() -> None:
            os.replace(partial, path)
            write_json_atomically(path.with_suffix(".json"), layer.to_json())

        await asyncio.to_thread(publish)
        self._layers[digest] = layer
        if reservation is not None:
            reservation.remaining = max(0, reservation.remaining - estimate)
        return layer

    async def remove(self, digest: str) -> bool:
        layer = self._layers.pop(digest, None)
        if layer is None:
            return False
        await asyncio.to_thread(_unlink_layer, layer.path)
        return True

    # -- space ----------------------------------------------------------------------------------

    def pinned(self) -> set[str]:
        self._expire_leases()
        return {d for lease in self._leases.values() for d in lease.digests}

    async def evict(self, need: int, protected: Iterable[str] = ()) -> list[str]:
        """Remove least recently used layers until `need` bytes are freed (or nothing is left to
        remove); never leased or `protected` ones. Returns the evicted digests."""
        freed, evicted = 0, []
        for layer in self._evictable(protected):
            if freed >= need:
                break
            self._layers.pop(layer.digest, None)
            freed += layer.blob.size
            evicted.append(layer.digest)
            await asyncio.to_thread(_unlink_layer, layer.path)
            log.info("evicted %s (%d bytes, last used %.0fs ago)", layer.digest, layer.blob.size,
                     time.time() - layer.last_used)
        self.evictions += len(evicted)
        return evicted

    def _evictable(self, protected: Iterable[str] = ()) -> list[StoredLayer]:
        """Layers eviction may remove, least recently used first: not leased, not `protected`, not
        wanted by a pull in progress."""
        keep = self.pinned() | set(protected) | {d for r in self._reservations for d in r.protected}
        return sorted((l for l in self._layers.values() if l.digest not in keep), key=lambda l: l.last_used)

    def check_fits(self, amount: int, what: str) -> None:
        """CacheFullError if `amount` bytes could never fit under the limit."""
        if amount > self.limit:
            raise CacheFullError(f"{what} needs about {amount:,} bytes but the cache limit is "
                                 f"{self.limit:,} bytes; raise --cache-max-bytes")

    async def reserve(self, amount: int, protected: Iterable[str], what: str) -> tuple[Reservation, list[str]]:
        """Promise `amount` bytes to a pull of `what`, evicting LRU layers if needed.

        Raises CacheFullError at once if `amount` exceeds the whole limit, or if not enough can be
        evicted (everything else is leased or in use). Returns the reservation and what was evicted.
        """
        protected = frozenset(protected)
        self.check_fits(amount, what)
        async with self._reserving:
            evicted: list[str] = []
            shortfall = amount - self.available()
            if shortfall > 0:
                # Evict nothing unless eviction can make enough room: a refused pull must not cost the
                # cache the layers it would have displaced.
                if sum(layer.blob.size for layer in self._evictable(protected)) < shortfall:
                    raise CacheFullError(
                        f"insufficient cache space for {what}: need {amount:,} bytes, available "
                        f"{max(0, self.available()):,} of {self.limit:,} (the rest is leased or being pulled)")
                evicted = await self.evict(shortfall, protected)
            reservation = Reservation(amount, protected)
            self._reservations.append(reservation)
            return reservation, evicted

    def release(self, reservation: Reservation) -> None:
        if reservation in self._reservations:
            self._reservations.remove(reservation)

    async def enforce_limit(self, protected: Iterable[str] = ()) -> list[str]:
        """After a blob turned out bigger than estimated: evict until back under the limit."""
        over = self.usage() + self.reserved() - self.limit
        return await self.evict(over, protected) if over > 0 else []

    async def prune(self, percent: float) -> PruneResult:
        before = self.usage()
        evicted = await self.evict(int(before * percent / 100.0))
        after = self.usage()
        return PruneResult(before, after, before - after, evicted)

    # -- leases ---------------------------------------------------------------------------------

    def _expire_leases(self) -> None:
        now = time.time()
        for lease_id in [i for i, lease in self._leases.items() if lease.expires_at <= now]:
            del self._leases[lease_id]

    def acquire_lease(self, digests: Iterable[str], ttl: float = DEFAULT_LEASE_TTL) -> Lease:
        """Pin layers against eviction; every digest must be here (KeyError names a missing one)."""
        self._expire_leases()
        wanted = tuple(dict.fromkeys(digests))
        for digest in wanted:
            if digest not in self._layers:
                raise KeyError(digest)
        lease = Lease(f"lease-{time.time_ns()}-{next(self._lease_ids)}", wanted,
                      time.time() + min(ttl, MAX_LEASE_TTL))
        self._leases[lease.lease_id] = lease
        return lease

    def renew_lease(self, lease_id: str, ttl: float = DEFAULT_LEASE_TTL) -> Lease | None:
        self._expire_leases()
        lease = self._leases.get(lease_id)
        if lease is not None:
            lease.expires_at = time.time() + min(ttl, MAX_LEASE_TTL)
        return lease

    def release_lease(self, lease_id: str) -> bool:
        return self._leases.pop(lease_id, None) is not None

    # -- image records --------------------------------------------------------------------------

    def _image_path(self, key: str) -> Path:
        return self.images_dir / f"{hashlib.sha256(key.encode()).hexdigest()}.json"

    async def save_image(self, key: str, record: dict[str, Any]) -> None:
        await asyncio.to_thread(write_json_atomically, self._image_path(key), {"key": key, **record})

    async def images(self) -> list[dict[str, Any]]:
        def load_all() -> list[dict[str, Any]]:
            records = []
            for path in sorted(self.images_dir.glob("*.json")):
                try:
                    records.append(json.loads(path.read_text()))
                except (OSError, ValueError):
                    log.warning("ignoring unreadable image record %s", path)
            return records
        return await asyncio.to_thread(load_all)


def _bump_mtime(path: Path, when: float) -> None:
    try:
        os.utime(path, (when, when))
    except OSError:
        pass  # evicted meanwhile


def _unlink_layer(path: Path) -> None:
    path.with_suffix(".json").unlink(missing_ok=True)  # description first: a blob without one is garbage
    path.unlink(missing_ok=True)
