"""The writable layer a command left, as a gzip tar streamed in chunks (`tar_chunk` frames).

The overlay upper holds exactly what changed: new and modified files, directories copied up on the
way, and overlayfs whiteouts (0/0 character devices) for deletions, which go into the tar as they are,
like the reference. A directory the command replaced wholesale is marked opaque by overlayfs
(xattr trusted.overlay.opaque=y); the reference dropped that, here it is kept as the PAX record
`SCHILY.xattrs.trusted.overlay.opaque=y` on the directory entry (tar readers that do not know it,
the SDK's included, ignore it). Owner names are left empty: the host's names mean nothing in the image.

With `--userns` the upper holds host ids (the container's root is host uid `start`): they are shifted
back to the container's (`IdMap.to_container`; an id outside the map becomes 65534, nobody).

`upper_size` is what the tar would hold (file bytes plus a 512-byte header per entry), checked against
`--max-upper-bytes` before anything is sent.

The archive is built in a thread; a small queue between it and the event loop gives backpressure,
so a slow client slows the reader down instead of the archive piling up in memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import os
import queue
import stat
import tarfile
import threading
from collections.abc import AsyncIterator
from pathlib import Path

from afsd.afslet.bundle import IdMap

OPAQUE_XATTR = "trusted.overlay.opaque"
OPAQUE_PAX = "SCHILY.xattrs." + OPAQUE_XATTR
QUEUE_DEPTH = 4
NOBODY = 65534
TAR_BLOCK = 512


class _Cancelled(Exception):
    pass


class _ChunkWriter:
    """A write-only file object that hands `chunk_size` pieces to a bounded queue."""

    def __init__(self, chunks: queue.Queue[bytes | BaseException | None], chunk_size: int,
                 stop: threading.Event) -> None:
        self._chunks = chunks
        self._size = chunk_size
        self._stop = stop
        self._buffer = bytearray()

    def write(self, data: bytes) -> int:
        self._buffer += data
        while len(self._buffer) >= self._size:
            self.put(bytes(self._buffer[:self._size]))
            del self._buffer[:self._size]
        return len(data)

    def flush(self) -> None:
        pass

    def finish(self) -> None:
        if self._buffer:
            self.put(bytes(self._buffer))
            self._buffer.clear()

    def put(self, item: bytes | BaseException | None) -> None:
        while True:
            if self._stop.is_set():
                raise _Cancelled()
            try:
                self._chunks.put(item, timeout=0.2)
                return
            except queue.Full:
                continue


def upper_size(upper: Path) -> int:
    """File bytes plus a tar header for every entry under `upper` (0 if it does not exist)."""
    total = 0
    for directory, dirnames, filenames in os.walk(upper):
        for name in dirnames + filenames:
            total += TAR_BLOCK
            with contextlib.suppress(OSError):
                status = os.lstat(os.path.join(directory, name))
                if stat.S_ISREG(status.st_mode):
                    total += status.st_size
    return total


def _tarinfo(archive: tarfile.TarFile, path: Path, name: str, id_map: IdMap | None) -> tarfile.TarInfo | None:
    info = archive.gettarinfo(str(path), arcname=name)
    if info is None:  # sockets cannot be archived
        return None
    info.uname = info.gname = ""
    if id_map is not None:
        info.uid, info.gid = (NOBODY if (mapped := id_map.to_container(host_id)) is None else mapped
                              for host_id in (info.uid, info.gid))
    if info.isdir():
        with contextlib.suppress(OSError):
            if os.getxattr(path, OPAQUE_XATTR, follow_symlinks=False) == b"y":
                info.pax_headers = {OPAQUE_PAX: "y"}
    return info


def write_upper_tar(upper: Path, out: _ChunkWriter, id_map: IdMap | None = None) -> None:
    gz = gzip.GzipFile(fileobj=out, mode="wb", compresslevel=6, mtime=0)  # type: ignore[arg-type]
    with tarfile.open(fileobj=gz, mode="w|", format=tarfile.PAX_FORMAT) as archive:
        if upper.is_dir():
            for directory, dirnames, filenames in os.walk(upper):
                dirnames.sort()
                base = Path(directory)
                for entry in sorted(dirnames) + sorted(filenames):
                    path = base / entry
                    name = str(path.relative_to(upper))
                    info = _tarinfo(archive, path, name, id_map)
                    if info is None:
                        continue
                    if info.isreg():
                        with open(path, "rb") as data:
                            archive.addfile(info, data)
                    else:
                        archive.addfile(info)
                # os.walk lists symlinks to directories among dirnames but does not descend into them.
    gz.close()
    out.finish()


async def stream_upper_tar(upper: Path, chunk_size: int, id_map: IdMap | None = None) -> AsyncIterator[bytes]:
    """Chunks of the gzip tar of `upper` (an empty archive if it does not exist)."""
    chunks: queue.Queue[bytes | BaseException | None] = queue.Queue(maxsize=QUEUE_DEPTH)
    stop = threading.Event()
    writer = _ChunkWriter(chunks, chunk_size, stop)

    def produce() -> None:
        try:
            write_upper_tar(upper, writer, id_map)
        except _Cancelled:
            return
        except Exception as error:  # noqa: BLE001 - handed to the consumer, which raises it
            with contextlib.suppress(_Cancelled):
                writer.put(error)
            return
        with contextlib.suppress(_Cancelled):
            writer.put(None)

    def take() -> bytes | BaseException | None:
        # Polls, so that a consumer that went away never leaves a thread blocked here.
        while not stop.is_set():
            try:
                return chunks.get(timeout=0.2)
            except queue.Empty:
                continue
        return None

    producer = asyncio.ensure_future(asyncio.to_thread(produce))
    try:
        while True:
            item = await asyncio.to_thread(take)
            if item is None:
                break
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        with contextlib.suppress(queue.Empty):
            while True:
                chunks.get_nowait()
        await asyncio.shield(producer)
