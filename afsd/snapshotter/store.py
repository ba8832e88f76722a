"""The snapshotter's metadata: snapshots, and the lazy layers behind some of them, in one sqlite file.

The rules are those of containerd's snapshot storage (snapshots/storage in containerd 1.6), which
containerd's callers rely on:
- a snapshot is `active` (writable, named by its key), `view` (read-only, named by its key) or
  `committed` (read-only, named by the name it was committed under); keys and names share one space;
- a parent is always a committed snapshot; a snapshot with children cannot be removed;
- committing turns an active snapshot into a committed one under a new name; its labels are
  replaced by the commit's, not inherited.
Every snapshot has an integer id, never reused, which names its directory (see `layout`).

A snapshot whose layer afsd serves lazily has a `LazyLayer` row: the node daemon's lease that keeps
the layer attached (recorded before the lease is asked for, so a crash leaves nothing unaccounted)
and where the layer is mounted.

All methods block (sqlite): call them from a thread. One connection, guarded by a lock.
"""

from __future__ import annotations

import enum
import json
import sqlite3
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from afsd.errors import AfsdError

MAX_LABEL_BYTES = 4096   # a label's key and value together (containerd's limit)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS snapshots (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    name        TEXT NOT NULL UNIQUE,
    parent_id   INTEGER REFERENCES snapshots(id),
    kind        TEXT NOT NULL,
    created_ns  INTEGER NOT NULL,
    updated_ns  INTEGER NOT NULL,
    labels      TEXT NOT NULL,
    size        INTEGER NOT NULL DEFAULT 0,
    inodes      INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS snapshots_parent ON snapshots(parent_id);
CREATE TABLE IF NOT EXISTS lazy_layers (
    snapshot_id     INTEGER PRIMARY KEY REFERENCES snapshots(id) ON DELETE CASCADE,
    lease_id        TEXT NOT NULL UNIQUE,
    layer_digest    TEXT NOT NULL,
    image           TEXT NOT NULL,
    manifest_digest TEXT NOT NULL,
    mountpoint      TEXT NOT NULL,
    implicit_dirs   TEXT NOT NULL,
    size            INTEGER NOT NULL
);
"""


class Kind(enum.Enum):
    VIEW = "view"
    ACTIVE = "active"
    COMMITTED = "committed"


class SnapshotNotFoundError(AfsdError):
    """No snapshot has that key or name (or its parent is missing)."""


class SnapshotExistsError(AfsdError):
    """A snapshot with that key or name exists already."""


class SnapshotStateError(AfsdError):
    """The snapshot is in the wrong state for the request (committing a view, removing a parent, ...)."""


class SnapshotArgumentError(AfsdError):
    """A request that can never succeed as made (a parent that is not committed, oversized labels, ...)."""


@dataclass(frozen=True)
class LazyLayer:
    """A layer the node daemon keeps attached for a committed snapshot, under `lease_id`."""

    lease_id: str
    layer_digest: str
    image: str
    manifest_digest: str
    mountpoint: str = ""                    # the node daemon's erofs mount of the layer ("" until attached)
    implicit_dirs: tuple[str, ...] = ()
    size: int = 0                           # bytes of its erofs blob


@dataclass(frozen=True)
class Snapshot:
    id: int
    name: str
    parent: str                             # the parent's name, "" for none
    parent_id: int | None
    kind: Kind
    created_ns: int
    updated_ns: int
    labels: Mapping[str, str]
    size: int = 0                           # usage recorded at commit
    inodes: int = 0
    lazy: LazyLayer | None = None


def check_labels(labels: Mapping[str, str]) -> dict[str, str]:
    for key, value in labels.items():
        if not key:
            raise SnapshotArgumentError("a label needs a key")
        if len(key.encode()) + len(value.encode()) > MAX_LABEL_BYTES:
            raise SnapshotArgumentError(f"label {key[:80]!r} is over {MAX_LABEL_BYTES} bytes with its value")
    return dict(labels)


class MetaStore:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    # -- reading --------------------------------------------------------------------------------

    def get(self, name: str) -> Snapshot:
        with self._transaction() as db:
            return self._get(db, name)

    def chain(self, snapshot: Snapshot) -> list[Snapshot]:
        """The snapshot's ancestors, its parent first."""
        with self._transaction() as db:
            ancestors, parent_id = [], snapshot.parent_id
            while parent_id is not None:
                row = db.execute(_SELECT + " WHERE s.id = ?", (parent_id,)).fetchone()
                if row is None:
                    raise SnapshotNotFoundError(f"snapshot {snapshot.name!r} has lost its parent (id {parent_id})")
                ancestors.append(_snapshot(row))
                parent_id = ancestors[-1].parent_id
            return ancestors

    def all(self) -> list[Snapshot]:
        with self._transaction() as db:
            return [_snapshot(row) for row in db.execute(_SELECT + " ORDER BY s.id")]

    def ids(self) -> set[int]:
        with self._transaction() as db:
            return {row[0] for row in db.execute("SELECT id FROM snapshots")}

    def lease_ids(self) -> set[str]:
        with self._transaction() as db:
            return {row[0] for row in db.execute("SELECT lease_id FROM lazy_layers")}

    # -- writing --------------------------------------------------------------------------------

    def create(self, kind: Kind, key: str, parent: str, labels: Mapping[str, str],
               lazy: LazyLayer | None = None) -> Snapshot:
        """A new active or view snapshot (with the lazy layer it is about to become, if any)."""
        if kind == Kind.COMMITTED:
            raise SnapshotArgumentError("only active or view snapshots can be created")
        if not key:
            raise SnapshotArgumentError("a snapshot needs a key")
        labels = check_labels(labels)
        with self._transaction() as db:
            parent_id = None
            if parent:
                parent_snapshot = self._get(db, parent, what="parent snapshot")
                if parent_snapshot.kind != Kind.COMMITTED:
                    raise SnapshotArgumentError(f"parent {parent!r} is not a committed snapshot")
                parent_id = parent_snapshot.id
            if self._find(db, key) is not None:
                raise SnapshotExistsError(f"snapshot {key!r} already exists")
            now = time.time_ns()
            cursor = db.execute("INSERT INTO snapshots (name, parent_id, kind, created_ns, updated_ns, labels) "
                                "VALUES (?, ?, ?, ?, ?, ?)", (key, parent_id, kind.value, now, now, json.dumps(labels)))
            if lazy is not None:
                self._put_lazy(db, cursor.lastrowid, lazy)
            return self._get(db, key)

    def commit(self, key: str, name: str, labels: Mapping[str, str], *, size: int = 0, inodes: int = 0,
               lazy: LazyLayer | None = None) -> Snapshot:
        """Turn active snapshot `key` into committed snapshot `name`, with exactly `labels`."""
        if not name:
            raise SnapshotArgumentError("a committed snapshot needs a name")
        labels = check_labels(labels)
        with self._transaction() as db:
            if self._find(db, name) is not None:
                raise SnapshotExistsError(f"committed snapshot {name!r} already exists")
            active = self._get(db, key, what="active snapshot")
            if active.kind != Kind.ACTIVE:
                raise SnapshotStateError(f"snapshot {key!r} is not active")
            now = time.time_ns()
            db.execute("UPDATE snapshots SET name = ?, kind = ?, created_ns = ?, updated_ns = ?, labels = ?, "
                       "size = ?, inodes = ? WHERE id = ?",
                       (name, Kind.COMMITTED.value, now, now, json.dumps(labels), size, inodes, active.id))
            if lazy is not None:
                self._put_lazy(db, active.id, lazy)
            return self._get(db, name)

    def set_lazy(self, snapshot_id: int, lazy: LazyLayer) -> None:
        with self._transaction() as db:
            self._put_lazy(db, snapshot_id, lazy)

    def drop_lazy(self, snapshot_id: int) -> None:
        with self._transaction() as db:
            db.execute("DELETE FROM lazy_layers WHERE snapshot_id = ?", (snapshot_id,))

    def remove(self, key: str) -> Snapshot:
        """Forget a snapshot without children; returns what it was."""
        with self._transaction() as db:
            snapshot = self._get(db, key)
            if db.execute("SELECT 1 FROM snapshots WHERE parent_id = ? LIMIT 1", (snapshot.id,)).fetchone():
                raise SnapshotStateError(f"cannot remove snapshot {key!r}: other snapshots have it as their parent")
            db.execute("DELETE FROM lazy_layers WHERE snapshot_id = ?", (snapshot.id,))
            db.execute("DELETE FROM snapshots WHERE id = ?", (snapshot.id,))
            return snapshot

    def update_labels(self, name: str, labels: Mapping[str, str], fieldpaths: Sequence[str]) -> Snapshot:
        """containerd's Update: only labels are mutable; no field paths means replace them all."""
        with self._transaction() as db:
            snapshot = self._get(db, name)
            updated = dict(snapshot.labels)
            for path in fieldpaths or ["labels"]:
                if path.startswith("labels."):
                    key = path[len("labels."):]
                    if labels.get(key):
                        updated[key] = labels[key]
                    else:
                        updated.pop(key, None)
                elif path == "labels":
                    updated = dict(labels)
                else:
                    raise SnapshotArgumentError(f"cannot update field {path!r} of snapshot {name!r}: only labels "
                                                "are mutable")
            db.execute("UPDATE snapshots SET labels = ?, updated_ns = ? WHERE id = ?",
                       (json.dumps(check_labels(updated)), time.time_ns(), snapshot.id))
            return self._get(db, name)

    # -- helpers --------------------------------------------------------------------------------

    def _find(self, db: sqlite3.Connection, name: str) -> Snapshot | None:
        row = db.execute(_SELECT + " WHERE s.name = ?", (name,)).fetchone()
        return None if row is None else _snapshot(row)

    def _get(self, db: sqlite3.Connection, name: str, *, what: str = "snapshot") -> Snapshot:
        found = self._find(db, name)
        if found is None:
            raise SnapshotNotFoundError(f"{what} {name!r} does not exist")
        return found

    @staticmethod
    def _put_lazy(db: sqlite3.Connection, snapshot_id: int, lazy: LazyLayer) -> None:
        db.execute("INSERT OR REPLACE INTO lazy_layers (snapshot_id, lease_id, layer_digest, image, manifest_digest, "
                   "mountpoint, implicit_dirs, size) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                   (snapshot_id, lazy.lease_id, lazy.layer_digest, lazy.image, lazy.manifest_digest,
                    lazy.mountpoint, json.dumps(list(lazy.implicit_dirs)), lazy.size))


_SELECT = """
SELECT s.*, p.name AS parent_name, l.lease_id, l.layer_digest, l.image, l.manifest_digest, l.mountpoint,
       l.implicit_dirs, l.size AS layer_size
FROM snapshots s LEFT JOIN snapshots p ON p.id = s.parent_id LEFT JOIN lazy_layers l ON l.snapshot_id = s.id
"""


def _snapshot(row: sqlite3.Row) -> Snapshot:
    lazy = None
    if row["lease_id"] is not None:
        lazy = LazyLayer(lease_id=row["lease_id"], layer_digest=row["layer_digest"], image=row["image"],
                         manifest_digest=row["manifest_digest"], mountpoint=row["mountpoint"],
                         implicit_dirs=tuple(json.loads(row["implicit_dirs"])), size=row["layer_size"])
    return Snapshot(id=row["id"], name=row["name"], parent=row["parent_name"] or "", parent_id=row["parent_id"],
                    kind=Kind(row["kind"]), created_ns=row["created_ns"], updated_ns=row["updated_ns"],
                    labels=json.loads(row["labels"]), size=row["size"], inodes=row["inodes"], lazy=lazy)
