"""Every message of the two supervised backends (fanotify/, cachefiles/), defined once, with one encoding.

Each message is a frozen dataclass; `to_json()` makes the frame body afsd/ondemand/_wire.py sends (a JSON
object whose "op" names the class), and `parse()` turns a received frame back into the class, checking
every field's type: a frame that does not fit is a ProtocolError, never a KeyError deep in a daemon.

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

import dataclasses
import enum
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar, Union

from afsd.ondemand._wire import ProtocolError
from afsd.ondemand.spec import BlobSpec, Priority
from afsd.ondemand.trace import RecordedTrace

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


# == the encoding =====================================================================================

M = TypeVar("M", bound="Message")
MESSAGES: dict[str, type[Message]] = {}


def message(op: str) -> Callable[[type[M]], type[M]]:
    """Register a message class under the `op` its frames carry."""

    def register(cls: type[M]) -> type[M]:
        if op in MESSAGES:
            raise TypeError(f"two messages named {op!r}")
        cls.op = op
        MESSAGES[op] = cls
        return cls
    return register


@dataclass(frozen=True, kw_only=True)
class Message:
    op: ClassVar[str] = ""
    id: int = 0          # a request's id, echoed by its Reply (0: no reply expected or matched)

    def to_json(self) -> dict[str, Any]:
        return {"op": self.op, **encode(self)}


def parse(frame: dict[str, Any]) -> Message:
    """The message a received frame carries; ProtocolError when it is unknown or malformed."""
    op = frame.get("op")
    cls = MESSAGES.get(op) if isinstance(op, str) else None
    if cls is None:
        raise ProtocolError(f"unknown message {op!r}")
    return _decoder(cls)({key: value for key, value in frame.items() if key not in ("op", "nfds")}, op)


def parse_as(frame: dict[str, Any], cls: type[M]) -> M:
    """`parse`, requiring a message of type `cls`."""
    parsed = parse(frame)
    if not isinstance(parsed, cls):
        raise ProtocolError(f"expected {cls.op!r}, got {parsed.op!r}")
    return parsed


_PLAIN = frozenset({str, int, float, bool, type(None)})   # exact types: enums (str/int subclasses) are not plain
_FIELD_NAMES: dict[type, tuple[str, ...]] = {}


def encode(value: Any) -> Any:
    """Any message part (a status, a spec, ...) as plain JSON values."""
    if type(value) in _PLAIN:
        return value
    if isinstance(value, BlobSpec):
        return value.to_json()
    if isinstance(value, enum.Enum):
        return value.value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        names = _FIELD_NAMES.get(type(value))
        if names is None:
            names = _FIELD_NAMES[type(value)] = tuple(item.name for item in dataclasses.fields(value))
        return {name: encode(getattr(value, name)) for name in names}
    if isinstance(value, dict):
        return {key: encode(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [encode(item) for item in value]
    return value


# Decoding: one function per type, made once from its type hints (messages cross the fetch path's hot
# loop: a miss costs four of them), each checking what it is given and naming the field that is wrong.
Decoder = Callable[[Any, str], Any]
_DECODERS: dict[Any, Decoder] = {}


def _decoder(kind: Any) -> Decoder:
    decoder = _DECODERS.get(kind)
    if decoder is None:
        decoder = _DECODERS[kind] = _make_decoder(kind)
    return decoder


def _make_decoder(kind: Any) -> Decoder:
    origin = typing.get_origin(kind)
    if kind is Any:
        return lambda value, where: value
    if origin in (Union, types.UnionType):
        options = typing.get_args(kind)
        (inner_kind,) = [option for option in options if option is not type(None)]
        inner = _decoder(inner_kind)
        optional = type(None) in options
        return lambda value, where: None if value is None and optional else inner(value, where)
    if origin is list:
        (item_kind,) = typing.get_args(kind)
        item = _decoder(item_kind)

        def decode_list(value: Any, where: str) -> Any:
            _expect(isinstance(value, list), "a list", value, where)
            return [item(element, f"{where}[{index}]") for index, element in enumerate(value)]
        return decode_list
    if origin is dict:
        _, item_kind = typing.get_args(kind)
        item = _decoder(item_kind)

        def decode_dict(value: Any, where: str) -> Any:
            _expect(isinstance(value, dict) and all(isinstance(k, str) for k in value), "an object", value, where)
            return {key: item(element, f"{where}.{key}") for key, element in value.items()}
        return decode_dict
    if kind is BlobSpec:
        def decode_spec(value: Any, where: str) -> Any:
            _expect(isinstance(value, dict), "a blob spec", value, where)
            try:
                return BlobSpec.from_json(value)
            except (KeyError, ValueError, TypeError) as e:
                raise ProtocolError(f"{where}: not a valid blob spec ({e!r})") from None
        return decode_spec
    if isinstance(kind, type) and issubclass(kind, enum.Enum):
        def decode_enum(value: Any, where: str) -> Any:
            try:
                return kind(value)
            except ValueError:
                raise ProtocolError(f"{where}: {value!r} is not a {kind.__name__}") from None
        return decode_enum
    if dataclasses.is_dataclass(kind):
        return _dataclass_decoder(kind)
    if kind is float:
        def decode_float(value: Any, where: str) -> Any:
            _expect(isinstance(value, (int, float)) and not isinstance(value, bool), "a number", value, where)
            return float(value)
        return decode_float
    if kind is int:
        def decode_int(value: Any, where: str) -> Any:
            _expect(isinstance(value, int) and not isinstance(value, bool), "an integer", value, where)
            return value
        return decode_int

    def decode_plain(value: Any, where: str) -> Any:
        _expect(isinstance(value, kind), kind.__name__, value, where)
        return value
    return decode_plain


def _dataclass_decoder(kind: type) -> Decoder:
    hints = typing.get_type_hints(kind)
    fields = {item.name: _LazyDecoder(hints[item.name]) for item in dataclasses.fields(kind) if item.init}
    required = tuple(item.name for item in dataclasses.fields(kind) if item.init
                     and item.default is dataclasses.MISSING and item.default_factory is dataclasses.MISSING)

    def decode_dataclass(value: Any, where: str) -> Any:
        _expect(isinstance(value, dict), "an object", value, where)
        arguments = {}
        for name, item in value.items():
            field_decoder = fields.get(name)
            if field_decoder is not None:   # unknown fields are ignored: a newer peer may add some
                arguments[name] = field_decoder(item, f"{where}.{name}")
        missing = [name for name in required if name not in arguments]
        if missing:
            raise ProtocolError(f"{where}: missing {', '.join(missing)}")
        return kind(**arguments)
    return decode_dataclass


class _LazyDecoder:
    """A field's decoder, made at its first use (a dataclass may name types defined after it)."""

    __slots__ = ("kind", "decoder")

    def __init__(self, kind: Any) -> None:
        self.kind = kind
        self.decoder: Decoder | None = None

    def __call__(self, value: Any, where: str) -> Any:
        if self.decoder is None:
            self.decoder = _decoder(self.kind)
        return self.decoder(value, where)


def _expect(ok: bool, what: str, value: Any, where: str) -> None:
    if not ok:
        raise ProtocolError(f"{where}: expected {what}, got {type(value).__name__}")


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
    window now (the node daemon asks before it detaches the blob)."""

    name: str
    close: bool = False


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
