"""Verified registry metadata kept by digest, so that resolving an image again costs the registry at most
one manifest request (for a tag, whose target may have moved) and never a config download.

Where it sits: the registry client (`client.py`) looks here before asking a registry and stores what it
verified. Image configs are content-addressed and identical in every repository, so they are kept by
digest alone; manifests fetched by digest are kept per repository (a digest reference must name a
manifest of *that* repository, which the registry checked when it served it).

With a directory (the layerstore's), configs also survive restarts: the layerstore serves them to
discovery and to its peers (`LayerStore.ReadImageConfig`), so a config, like a layer, leaves the
registry once per cluster. Everything read back from disk is checked against its digest again.
"""

from __future__ import annotations

import asyncio
import os
from collections import OrderedDict
from pathlib import Path

from afsd.oci.digest import digest_algorithm, digest_bytes, parse_digest

DEFAULT_MAX_BYTES = 64 * 1024 * 1024


class _BoundedBytes:
    """An LRU map of byte strings that holds at most `max_bytes` of values."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._items: OrderedDict[tuple[str, ...], tuple[bytes, str]] = OrderedDict()
        self._size = 0

    def get(self, key: tuple[str, ...]) -> tuple[bytes, str] | None:
        item = self._items.get(key)
        if item is not None:
            self._items.move_to_end(key)
        return item

    def put(self, key: tuple[str, ...], data: bytes, media_type: str) -> None:
        if len(data) > self.max_bytes:
            return
        old = self._items.pop(key, None)
        if old is not None:
            self._size -= len(old[0])
        self._items[key] = (data, media_type)
        self._size += len(data)
        while self._size > self.max_bytes:
            _, (evicted, _) = self._items.popitem(last=False)
            self._size -= len(evicted)


class MetadataCache:
    """Manifests and image configs already verified against their digests (memory, plus configs on disk).

    Callers store only bytes they checked; `config()` and `manifest()` return bytes that match the digest
    asked for, or None.
    """

    def __init__(self, directory: Path | None = None, *, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.directory = directory
        self.max_bytes = max_bytes
        self._memory = _BoundedBytes(max_bytes)

    # -- configs (any repository) -----------------------------------------------------------------

    async def config(self, digest: str) -> bytes | None:
        digest = parse_digest(digest)
        held = self._memory.get(("config", digest))
        if held is not None:
            return held[0]
        if self.directory is None:
            return None
        data = await asyncio.to_thread(self._read_config_file, digest)
        if data is not None:
            self._memory.put(("config", digest), data, "")
        return data

    async def add_config(self, digest: str, data: bytes) -> None:
        """Keep `data`, which the caller verified to be the blob `digest`."""
        digest = parse_digest(digest)
        self._memory.put(("config", digest), data, "")
        if self.directory is not None:
            await asyncio.to_thread(self._write_config_file, digest, data)

    def _config_path(self, digest: str) -> Path:
        assert self.directory is not None
        return self.directory / "configs" / digest.replace(":", "-")

    def _read_config_file(self, digest: str) -> bytes | None:
        path = self._config_path(digest)
        try:
            data = path.read_bytes()
        except OSError:
            return None
        if digest_bytes(data, digest_algorithm(digest)) != digest:  # a torn or tampered file: forget it
            path.unlink(missing_ok=True)
            return None
        os.utime(path)  # recently used: the last to be pruned
        return data

    def _write_config_file(self, digest: str, data: bytes) -> None:
        path = self._config_path(digest)
        if path.exists():
            os.utime(path)
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
        partial.write_bytes(data)
        os.replace(partial, path)
        self._prune_files()

    def _prune_files(self) -> None:
        """Keep the directory under `max_bytes`, dropping the least recently used configs first."""
        entries = []
        for path in (self.directory / "configs").iterdir():  # type: ignore[operator]
            try:
                stat = path.stat()
            except OSError:
                continue
            entries.append((stat.st_mtime, stat.st_size, path))
        total = sum(size for _, size, _ in entries)
        for _, size, path in sorted(entries):
            if total <= self.max_bytes:
                break
            path.unlink(missing_ok=True)
            total -= size

    # -- manifests (per repository) ---------------------------------------------------------------

    def manifest(self, repository: str, digest: str) -> tuple[bytes, str] | None:
        """`(raw, content type)` of the manifest `digest` of `repository` (`registry/name`), if seen."""
        return self._memory.get(("manifest", repository, digest))

    def add_manifest(self, repository: str, digest: str, data: bytes, media_type: str) -> None:
        self._memory.put(("manifest", repository, parse_digest(digest)), data, media_type)
