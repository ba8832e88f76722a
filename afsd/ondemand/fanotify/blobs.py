"""The blobs a fanotify supervisor serves: registering one (fill fd, keeper's copy, mark), its record on
disk so a successor serves it too, finding it by inode for an event, marking it complete, retiring it, and
its status.

Where it sits: supervisor.py turns register/unregister requests and startup into these calls, and deals
with what depends on a blob's events and fill tasks itself; this module owns the kernel-facing state of
each blob (its fill fd and mark) and DIR/blobs/<name>.json.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from typing import Any

from afsd.fsutil import write_json_atomically
from afsd.ondemand.fanotify import _sys
from afsd.ondemand.fanotify.blobfile import check_blob_file, mounts_of
from afsd.ondemand.fanotify.keeperlink import KeeperHolder, KeeperUnreachableError
from afsd.ondemand.fanotify.model import Blob
from afsd.ondemand.fanotify.paths import StatePaths
from afsd.ondemand.sparse import first_hole, present_bytes
from afsd.ondemand.spec import BlobSpec
from afsd.ondemand.supervised.protocol import BlobStatus


class RegistrationError(Exception):
    """A register/unregister request that cannot be carried out; the message goes to the caller."""


class BlobTable:
    def __init__(self, paths: StatePaths, keeper: KeeperHolder, log: logging.Logger) -> None:
        self.paths = paths
        self.keeper = keeper
        self.log = log
        self.group_fd = -1
        self._by_name: dict[str, Blob] = {}
        self._by_inode: dict[tuple[int, int], Blob] = {}
        self.changes = 0   # bumped whenever a blob starts or stops being served by a fill fd (intake.py's table)

    def __iter__(self) -> Iterator[Blob]:
        return iter(list(self._by_name.values()))

    def __len__(self) -> int:
        return len(self._by_name)

    def get(self, name: str) -> Blob | None:
        return self._by_name.get(name)

    def at_inode(self, dev: int, ino: int) -> Blob | None:
        return self._by_inode.get((dev, ino))

    def fill_fds(self) -> list[tuple[str, int]]:
        return [(blob.name, blob.fill_fd) for blob in self if blob.fill_fd is not None]

    def served(self) -> list[tuple[int, int, int, int]]:
        """(st_dev, st_ino, size, fill fd) of every blob served through a fill fd."""
        return [(*blob.inode, blob.spec.size, blob.fill_fd) for blob in self if blob.fill_fd is not None]

    def _add(self, blob: Blob) -> None:
        self._by_name[blob.name] = blob
        self._by_inode[blob.inode] = blob
        self.changes += 1

    # -- registering ----------------------------------------------------------------------------------

    def register(self, spec: BlobSpec, path: str, source: dict[str, Any], prefetch: bool, *,
                 from_record: bool = False) -> tuple[Blob, bool]:
        """Serve the blob file at `path` (prepared by prepare_blob); (the blob, whether it is new here).
        Idempotent for the same name and path."""
        existing = self._by_name.get(spec.name)
        if existing is not None:
            if existing.path != path:
                raise RegistrationError(f"blob {spec.name} is already registered at {existing.path}")
            return existing, False
        if not os.path.isabs(path):
            raise RegistrationError(f"blob path {path} is not absolute")
        mounted_at = [] if from_record else mounts_of(path)
        if mounted_at:
            raise RegistrationError(
                f"blob {path} is already mounted at {mounted_at[0]} without a fanotify mark (its reads "
                "would see holes as zeros): unmount it, register, then mount")
        if not os.path.exists(path):
            raise RegistrationError(f"blob {path} does not exist: create it with prepare_blob first")
        # A mark of ours left on the inode by an unregister (retire) would make the fill fd we are about
        # to open raise events on its own writes: remove it first (nobody has the blob mounted).
        _sys.unmark_path(self.group_fd, path)
        try:
            fill_fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as e:
            raise RegistrationError(f"cannot open blob {path}: {e.strerror}") from None
        try:
            inode, complete = check_blob_file(spec, path, fill_fd)
            blob = Blob(name=spec.name, path=path, spec=spec, source=source, prefetch=prefetch, fill_fd=fill_fd,
                        inode=inode, complete=complete)
            if not blob.complete:
                if not from_record:
                    # Not fsynced (a journal commit, on a node busy writing blobs): the record is for a
                    # successor supervisor of this boot; the mark, the group and every mount of the blob
                    # end with a reboot, and the node daemon registers it again when it mounts it next.
                    write_json_atomically(self.paths.blob_record(spec.name), {
                        "path": path, "spec": spec.to_json(), "source": source, "prefetch": prefetch},
                        durable=False)
                self.keeper.hold_blob(spec.name, fill_fd)
                self.keeper.flush()   # the keeper's copy is in flight before the mark exists
                # Evictable: see retire (an unregistered blob's mark must not pin its inode).
                _sys.mark_pre_access(self.group_fd, fill_fd, evictable=True)
        except BaseException as e:
            os.close(fill_fd)
            if not from_record:
                self.paths.blob_record(spec.name).unlink(missing_ok=True)
            self.keeper.drop_blob(spec.name)
            if isinstance(e, KeeperUnreachableError):
                raise RegistrationError(str(e)) from None
            raise
        if blob.complete:
            os.close(fill_fd)
            blob.fill_fd = None
            self.paths.blob_record(spec.name).unlink(missing_ok=True)
        self._add(blob)
        return blob, True

    def records(self) -> Iterator[tuple[dict[str, Any], BlobSpec]]:
        """The blobs a predecessor registered and did not finish (DIR/blobs/*.json), with their specs;
        unreadable records are logged and skipped, those whose blob file is gone are removed."""
        for record_path in sorted(self.paths.blobs.glob("*.json")):
            try:
                record = json.loads(record_path.read_text())
                spec = BlobSpec.from_json(record["spec"])
                path = str(record["path"])
            except (OSError, ValueError, KeyError, TypeError) as e:
                self.log.error("ignoring unreadable blob record %s: %s", record_path, e)
                continue
            if not os.path.exists(path):
                self.log.warning("forgetting blob %s: %s is gone", spec.name, path)
                record_path.unlink(missing_ok=True)
                continue
            yield record, spec

    def adopt(self, record: dict[str, Any], spec: BlobSpec, fill_fd: int) -> Blob:
        """A blob our predecessor registered: its mark still exists and fill_fd is its pre-mark fd."""
        st = os.fstat(fill_fd)
        blob = Blob(name=spec.name, path=record["path"], spec=spec, source=record.get("source", {}),
                    prefetch=bool(record.get("prefetch")), fill_fd=fill_fd, inode=(st.st_dev, st.st_ino),
                    tainted=bool(record.get("tainted")))
        self._add(blob)
        return blob

    def taint(self, blob: Blob, record: dict[str, Any]) -> None:
        """The group that served `blob` is gone: reads in between may have seen zeros (say so on disk)."""
        blob.tainted = True
        write_json_atomically(self.paths.blob_record(blob.name), {**record, "tainted": True})

    # -- completing and retiring ----------------------------------------------------------------------

    def is_whole(self, blob: Blob) -> bool:
        """Whether a blob still being served has no hole left (SEEK_HOLE: reads no data, raises no event)."""
        return blob.fill_fd is not None and first_hole(blob.fill_fd, 0, blob.spec.size) is None

    def complete(self, blob: Blob) -> None:
        """The blob has no hole left: remove its mark (later reads cost nothing) and stop serving its fills."""
        if blob.fill_fd is None:
            return
        try:
            _sys.unmark_pre_access(self.group_fd, blob.fill_fd)
        except OSError as e:
            self.log.error("blob %s: cannot remove its mark: %s", blob.name, e)
        self.close_fill_fd(blob)
        blob.complete = True
        self.paths.blob_record(blob.name).unlink(missing_ok=True)

    def remove(self, blob: Blob) -> None:
        """Stop serving a blob and forget it. Its mark stays (evictable: it vanishes with the inode), so a
        mount we do not know about, e.g. a lazily detached one, gets EIO for unfilled ranges, not zeros."""
        self.close_fill_fd(blob)
        self._by_name.pop(blob.name, None)
        self._by_inode.pop(blob.inode, None)
        self.changes += 1
        self.paths.blob_record(blob.name).unlink(missing_ok=True)

    def close_fill_fd(self, blob: Blob) -> None:
        if blob.fill_fd is not None:
            self.keeper.drop_blob(blob.name)
            self.changes += 1
            os.close(blob.fill_fd)
            blob.fill_fd = None

    def status(self, blob: Blob) -> BlobStatus:
        fill_fd = blob.fill_fd
        present = blob.spec.size if blob.complete or fill_fd is None else present_bytes(fill_fd, blob.spec.size)
        return BlobStatus(name=blob.name, size=blob.spec.size, present_bytes=present, complete=blob.complete,
                          path=blob.path, path_complete=blob.complete, prefetch=blob.prefetch,
                          filled_bytes=blob.filled_bytes,
                          details={"tainted": blob.tainted, "pending_events": len(blob.pending),
                                   "inflight_tasks": len({id(t) for t in blob.inflight.values()}),
                                   **(blob.learned.details() if blob.learned is not None else {})})
