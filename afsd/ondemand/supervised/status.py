"""The states, roles and status records the supervised backends' messages (protocol.py) carry: what a
supervisor, its workers and its blobs are doing, as both backends report it.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from afsd.ondemand.spec import BlobSpec

# == states and roles =================================================================================


class Role(str, enum.Enum):
    FETCH_WORKER = "fetch-worker"      # fetches and writes ranges; holds no kernel fd (fanotify)
    KERNEL_WORKER = "kernel-worker"    # reads and answers the kernel's requests itself (fscache)
    SUPERVISOR = "supervisor"          # a fanotify supervisor, to its keeper


class DaemonState(str, enum.Enum):
    STARTING = "starting"
    SERVING = "serving"
    RESTARTING = "restarting"   # leaving so that a successor takes over what it holds (an upgrade)
    STOPPING = "stopping"       # shutting down in order; nothing takes over


class WorkerState(str, enum.Enum):
    STARTING = "starting"       # started, has not said hello
    READY = "ready"             # connected: gets work
    STOPPING = "stopping"       # told to stop or killed: gets no more work, waits to be reaped


class StopCause(str, enum.Enum):
    """Why a worker is gone, or going."""

    DIED = "died"               # on its own (crash, kill -9, its link closed)
    HUNG = "hung"               # killed: it stopped reporting
    UPGRADE = "upgrade"         # replaced on request
    SHUTDOWN = "shutdown"       # its supervisor is stopping or restarting


# == what status answers carry ========================================================================


@dataclass(frozen=True, kw_only=True)
class BlobStatus:
    name: str
    size: int
    present_bytes: int | None = None   # bytes where the kernel reads them (None: not counted yet)
    complete: bool = False             # the kernel's copy is whole
    path: str = ""                     # the blob as a plain file on this node ("" none): fanotify's blob file
    path_complete: bool = False        # itself, fscache's copy; whole: it can be handed to a layerstore
    prefetch: bool = False
    filled_bytes: int = 0              # written by this backend's fills
    details: dict[str, Any] = field(default_factory=dict)   # what only one backend has

    @property
    def ready(self) -> bool:
        """Every byte is here, and in the plain file if the blob has one (what the node daemon waits for)."""
        return self.complete and (not self.path or self.path_complete)


@dataclass(frozen=True, kw_only=True)
class WorkerStatus:
    pid: int
    role: Role
    state: WorkerState
    tasks: int = 0
    silent_for: float | None = None    # seconds since it last reported (None: not connected)


@dataclass(frozen=True, kw_only=True)
class SupervisorStatus:
    backend: str                       # "fanotify" or "fscache"
    pid: int
    state: DaemonState
    uptime: float
    settings: dict[str, Any]
    counters: dict[str, float]         # totals since this supervisor started, its workers' summed over restarts
    workers: list[WorkerStatus]
    blobs: list[BlobStatus]
    fetch: dict[str, float] = field(default_factory=dict)   # what the workers' sources counted, summed
    details: dict[str, Any] = field(default_factory=dict)   # what only one backend has

    def blob(self, name: str) -> BlobStatus | None:
        return next((blob for blob in self.blobs if blob.name == name), None)


@dataclass(frozen=True, kw_only=True)
class Registration:
    """A blob as the fscache supervisor keeps it: what its kernel worker needs to serve an OPEN."""

    spec: BlobSpec
    source: dict[str, Any]
    prefetch: bool = False
    copy_path: str = ""                # where the worker also writes the blob's bytes ("" nowhere)
    complete: bool = False             # a worker found (or made) the cache file whole
    learned: list[list[int]] = field(default_factory=list)   # as in Register
    record: float = 0.0


@dataclass(frozen=True, kw_only=True)
class BlobReport:
    """One blob as the fscache kernel worker sees it."""

    open_objects: int = 0
    complete: bool = False
    copy_complete: bool = False
    filled_bytes: int = 0
    present_bytes: int | None = None   # counted only while the worker holds the blob open
    copy_error: str = ""
    fetcher: dict[str, Any] = field(default_factory=dict)
    learned: dict[str, int] = field(default_factory=dict)   # its learned prefetch (LearnedPrefetch.details)


@dataclass(frozen=True, kw_only=True)
class WorkerReport:
    counters: dict[str, float] = field(default_factory=dict)   # totals, as in its heartbeats
    fetch: dict[str, float] = field(default_factory=dict)
    open_objects: int = 0
    reads_in_flight: int = 0
    blobs: dict[str, BlobReport] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class KeeperStatus:
    pid: int
    holder_pid: int
    group: bool
    blobs: list[str]
    respawns: int
    denying: bool
    orphan_denied: int
