"""The `eager` backend: fetch the whole blob, verify it, then mount it. For kernels with neither
cachefiles on-demand mode nor fanotify pre-content events; it needs only file-backed erofs (or a loop
device, which mount(2) of a file gives on older kernels through `mount -o loop`)."""

from __future__ import annotations

import asyncio
import hashlib
import os
from pathlib import Path

from afsd.errors import DigestMismatchError, FetchError
from afsd.ondemand.base import NO_STARTUP_TRACE, Backend, BlobSource, StartupTrace
from afsd.ondemand.sparse import write_at
from afsd.ondemand.spec import BlobSpec, Priority

# Bytes per request to the source: large, so a whole-blob fetch is a few dozen round trips.
EAGER_REQUEST = 8 << 20


class EagerBackend(Backend):
    name = "eager"

    @classmethod
    def unavailable_reason(cls) -> str | None:
        return None if Path("/proc/filesystems").read_text().find("erofs") >= 0 else \
            "this kernel has no erofs support (CONFIG_EROFS_FS)"

    async def attach(self, spec: BlobSpec, blob_path: Path, source: BlobSource,
                     startup: StartupTrace = NO_STARTUP_TRACE) -> None:
        if await asyncio.to_thread(_is_verified_copy, blob_path, spec):
            return
        partial = blob_path.with_name(f".{blob_path.name}.{os.getpid()}.partial")
        fd = await asyncio.to_thread(os.open, partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            whole = hashlib.sha256()
            position = 0
            while position < spec.size:
                wanted = min(EAGER_REQUEST, spec.size - position)
                fetched = await source.source.fetch(position, wanted, Priority.DEMAND)
                try:   # a source answering another range would make this loop spin or misplace bytes
                    fetched.require_covers(position, position + wanted)
                except ValueError as e:
                    raise FetchError(f"layer {spec.layer_digest}: {e}") from None
                data = fetched.data[position - fetched.offset:]
                await asyncio.to_thread(_write_at, fd, data, position, whole)
                position += len(data)
            if "sha256:" + whole.hexdigest() != spec.blob_digest:
                raise DigestMismatchError(f"the assembled blob of {spec.layer_digest} does not hash to {spec.blob_digest}")
            await asyncio.to_thread(os.fsync, fd)
        except BaseException:
            await asyncio.to_thread(_close_and_remove, fd, partial)
            raise
        await asyncio.to_thread(os.close, fd)
        await asyncio.to_thread(os.replace, partial, blob_path)


def _write_at(fd: int, data: bytes, offset: int, whole: hashlib._Hash) -> None:
    whole.update(data)
    write_at(fd, data, offset)


def _close_and_remove(fd: int, path: Path) -> None:
    os.close(fd)
    path.unlink(missing_ok=True)


def _is_verified_copy(path: Path, spec: BlobSpec) -> bool:
    """A complete blob left by an earlier attach (e.g. before a daemon restart)."""
    try:
        if path.stat().st_size != spec.size:
            return False
    except FileNotFoundError:
        return False
    whole = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            whole.update(chunk)
    return "sha256:" + whole.hexdigest() == spec.blob_digest
