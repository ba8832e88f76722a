"""Every message of the two supervised backends (fanotify/, cachefiles/), defined once, with one encoding.

Each message is a frozen dataclass; how it is encoded and checked on the way in is codec.py's job, the
states and status records it carries are status.py's. Both are re-exported here, so one import
(`from afsd.ondemand.supervised import protocol as p`) names every part of the protocol.

Who says what (each arrow one unix stream socket in the backend's state directory):

    node daemon (client) -> supervisor        Register, Unregister, StatusRequest, TraceRequest, Watch,
                                              Shutdown, Restart (fanotify), RestartWorker (fscache): one
                                              Reply each; after Watch, a BlobComplete per blob that became
                                              complete
    fetch worker <-> fanotify supervisor      Hello(FETCH_WORKER), Heartbeat, Written, FillDone, FillFailed /
                                              ServeBlob (+ the blob's fill fd), Fill, Cancel, Forget
    kernel worker <-> fscache supervisor      Hello(KERNEL_WORKER), Heartbeat, Lookup (-> Reply with a
                                              Registration), BlobComplete, CopyComplete / Report (-> Reply
                                              with a WorkerReport), TraceRequest (-> Reply with a trace),
                                              Forget
    fanotify supervisor <-> keeper            Hello(SUPERVISOR, argv, env) -> Held (+ group fd), HeldBlobs
                                              (+ fill fds)..., HeldEnd; HoldGroup (+ fd), HoldBlob (+ fd),
                                              DropBlob, Bye (-> Bye); anyone: StatusRequest -> Reply(keeper)

Roles say which process owns the kernel's fd: in fanotify the supervisor owns the group fd and answers
every event, its FETCH_WORKERs only fetch and write; in fscache the supervisor holds /dev/cachefiles to keep
the cache alive, and its one KERNEL_WORKER reads and answers the requests (it owns the anon fds).
Both supervisors answer StatusRequest with the same `SupervisorStatus`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from afsd.ondemand.spec import BlobSpec, Priority
# The codec and the status records are re-exported: `p.X` names every part of the protocol.
from afsd.ondemand.supervised.codec import MESSAGES, Message, encode, message, parse, parse_as  # noqa: F401
from afsd.ondemand.supervised.status import (  # noqa: F401
    BlobReport, BlobStatus, DaemonState, KeeperStatus, Registration, Role, StopCause, SupervisorStatus,
    WorkerReport, WorkerState, WorkerStatus)
from afsd.ondemand.trace import RecordedTrace


# == requests to a supervisor, and the one reply =======================================================


@message("register")
@dataclass(frozen=True, kw_only=True)
class Register(Message):
    """Serve `spec` from `source` (a source configuration: afsd/ondemand/sources.py). fanotify serves the
    sparse blob file at `path`; fscache serves OPENs of cookie key `spec.name` and, with `copy_path`, also
    keeps a plain copy of the blob there. `learned`: [offset, length] ranges readers of this blob read first
    (what the cluster learned, afsd/ondemand/trace.py), fetched in that order before the first miss is
    answered, at prefetch priority; `record`: record the blob's first reads for this many seconds (0: not)."""

    spec: BlobSpec
    source: dict[str, Any]
    prefetch: bool = False
    path: str = ""
    copy_path: str = ""
    learned: list[list[int]] = field(default_factory=list)
    record: float = 0.0


@message("unregister")
@dataclass(frozen=True, kw_only=True)
class Unregister(Message):
    name: str
    force: bool = False


@message("status")
@dataclass(frozen=True, kw_only=True)
class StatusRequest(Message):
    pass


@message("trace")
@dataclass(frozen=True, kw_only=True)
class TraceRequest(Message):
    """The recording of blob `name`'s first reads (Reply.trace; None: nothing recorded); `close` ends its
    window now (the node daemon asks before it detaches the blob); `detaching`: the blob is detached next, so
    the startup's end starts no whole-blob fill (fanotify: it would only take CPU from the unmount)."""

    name: str
    close: bool = False
    detaching: bool = False


@message("watch")
@dataclass(frozen=True, kw_only=True)
class Watch(Message):
    """Reply, then a BlobComplete on this connection for every blob that becomes ready from now on."""


@message("shutdown")
@dataclass(frozen=True, kw_only=True)
class Shutdown(Message):
    force: bool = False


@message("restart")
@dataclass(frozen=True, kw_only=True)
class Restart(Message):
    """fanotify: the supervisor exits and its keeper starts a fresh one, which takes over (an upgrade)."""


@message("restart-worker")
@dataclass(frozen=True, kw_only=True)
class RestartWorker(Message):
    """fscache: replace the kernel worker; requests in flight are delivered to its successor (restore)."""


@message("reply")
@dataclass(frozen=True, kw_only=True)
class Reply(Message):
    ok: bool = True
    error: str = ""
    blob: BlobStatus | None = None             # to Register
    status: SupervisorStatus | None = None     # to StatusRequest (a supervisor)
    keeper: KeeperStatus | None = None         # to StatusRequest (a keeper)
    registration: Registration | None = None   # to Lookup (None: nobody registered that name)
    report: WorkerReport | None = None         # to Report
    trace: RecordedTrace | None = None         # to TraceRequest


# == pushed by a supervisor to watchers, and by the fscache worker to its supervisor ===================


@message("complete")
@dataclass(frozen=True, kw_only=True)
class BlobComplete(Message):
    """Every byte of blob `name` is on this node (and in its plain file `path`, if it has one)."""

    name: str
    path: str = ""


@message("copy-complete")
@dataclass(frozen=True, kw_only=True)
class CopyComplete(Message):
    """fscache kernel worker: the copy of blob `name` has no hole left."""

    name: str


# == workers ==========================================================================================


@message("hello")
@dataclass(frozen=True, kw_only=True)
class Hello(Message):
    """The first message on a connection that is not a client's: who is speaking. A supervisor tells its
    keeper the command line (and environment) that restarts it."""

    role: Role
    argv: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)


@message("heartbeat")
@dataclass(frozen=True, kw_only=True)
class Heartbeat(Message):
    """Every `heartbeat` seconds: the worker is alive. Counters are totals since the worker started (a lost
    heartbeat loses nothing; the supervisor adds up its workers over restarts)."""

    tasks: int = 0
    counters: dict[str, float] = field(default_factory=dict)
    fetch: dict[str, float] = field(default_factory=dict)   # its source factory's totals (`metrics()`)


@message("blob")
@dataclass(frozen=True, kw_only=True)
class ServeBlob(Message):
    """fanotify: fill blob `name` from `source` when asked; carries the blob's fill fd (opened before the
    blob was marked, so its writes raise no events: the only fd a worker may write the blob through)."""

    name: str
    path: str
    spec: BlobSpec
    source: dict[str, Any]


@message("forget")
@dataclass(frozen=True, kw_only=True)
class Forget(Message):
    """The blob is complete or unregistered: drop it (its fd, its source)."""

    name: str


@message("fill")
@dataclass(frozen=True, kw_only=True)
class Fill(Message):
    """fanotify: fetch [offset, offset+length) of blob `name` and write its holes through the fill fd."""

    task: int
    name: str
    offset: int
    length: int
    priority: Priority = Priority.DEMAND


@message("cancel")
@dataclass(frozen=True, kw_only=True)
class Cancel(Message):
    task: int


@message("done")
@dataclass(frozen=True, kw_only=True)
class FillDone(Message):
    task: int
    written: int
    source: str = ""        # who served it: "local", "peer:HOST:PORT", ... (per-source byte counters)


@message("written")
@dataclass(frozen=True, kw_only=True)
class Written(Message):
    """fanotify: a fill in progress put bytes [offset, offset+length) of blob `name` into the blob file
    (verified): readers waiting on just those bytes may go on before the whole task is done."""

    name: str
    offset: int
    length: int


@message("failed")
@dataclass(frozen=True, kw_only=True)
class FillFailed(Message):
    task: int
    error: str


@message("lookup")
@dataclass(frozen=True, kw_only=True)
class Lookup(Message):
    """fscache: the registration of blob `name` (an OPEN arrived for it)."""

    name: str


@message("report")
@dataclass(frozen=True, kw_only=True)
class Report(Message):
    """fscache: what the kernel worker knows about its blobs (for a status)."""


# == the fanotify keeper ================================================================================


@message("held")
@dataclass(frozen=True, kw_only=True)
class Held(Message):
    """The keeper's answer to a supervisor's Hello: the group fd comes with it if `group`."""

    group: bool
    blobs: int = 0
    respawns: int = 0
    orphan_denied: int = 0


@message("held-blobs")
@dataclass(frozen=True, kw_only=True)
class HeldBlobs(Message):
    names: list[str]        # their fill fds come with it, in this order


@message("held-end")
@dataclass(frozen=True, kw_only=True)
class HeldEnd(Message):
    pass


@message("hold-group")
@dataclass(frozen=True, kw_only=True)
class HoldGroup(Message):
    pass


@message("hold-blob")
@dataclass(frozen=True, kw_only=True)
class HoldBlob(Message):
    name: str


@message("drop-blob")
@dataclass(frozen=True, kw_only=True)
class DropBlob(Message):
    name: str


@message("bye")
@dataclass(frozen=True, kw_only=True)
class Bye(Message):
    """Orderly shutdown: the keeper exits and restarts no supervisor (it answers Bye once it will)."""
