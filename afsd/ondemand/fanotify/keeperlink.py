"""The supervisor's side of the keeper protocol (keeper.py; messages: afsd/ondemand/supervised/protocol.py):
find or start the keeper, take back what it holds, hand it every fd it must hold from then on, and replace
it when it dies (`KeeperHolder`)."""

from __future__ import annotations

import errno
import logging
import os
import select
import selectors
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from afsd.ondemand._wire import Connection, FrameDecoder, ProtocolError, peer_pid, receive, send_blocking
from afsd.ondemand.fanotify.paths import StatePaths
from afsd.ondemand.supervised import protocol as p

CONNECT_TIMEOUT = 15.0
HANDSHAKE_TIMEOUT = 30.0   # a keeper answers a new supervisor once its predecessor's connection is gone


class KeeperUnavailableError(Exception):
    """The keeper cannot take an fd right now (it is being replaced, or not reading)."""


@dataclass
class Held:
    """What a keeper gave back at hello: the group fd (None if it had none), fill fds by blob name,
    and how many times it restarted a supervisor."""

    group_fd: int | None = None
    fills: dict[str, int] = field(default_factory=dict)
    respawns: int = 0


def keeper_command(paths: StatePaths, orphan_deadline: float) -> list[str]:
    return [sys.executable, "-m", "afsd.ondemand.fanotify.keeper", "--state-dir", str(paths.root),
            "--orphan-deadline", str(orphan_deadline), "--daemon"]


class KeeperLink:
    def __init__(self, sock: socket.socket) -> None:
        self.pid = peer_pid(sock)
        self.connection = Connection(sock)

    @classmethod
    def connect(cls, paths: StatePaths, orphan_deadline: float, argv: list[str], *,
                spawn: bool) -> tuple[KeeperLink, Held]:
        """Connect (starting a keeper first if `spawn` and none answers), say hello with the command
        line that restarts us, and receive what the keeper holds. Blocks until done."""
        sock = _connect(paths, orphan_deadline, spawn)
        try:
            send_blocking(sock, p.Hello(role=p.Role.SUPERVISOR, argv=argv, env=dict(os.environ)).to_json())
            held = _handshake(sock)
        except BaseException:
            sock.close()
            raise
        return cls(sock), held

    def hold_group(self, group_fd: int) -> None:
        self.connection.send(p.HoldGroup().to_json(), [group_fd])

    def hold_blob(self, name: str, fill_fd: int) -> None:
        self.connection.send(p.HoldBlob(name=name).to_json(), [fill_fd])

    def drop_blob(self, name: str) -> None:
        self.connection.send(p.DropBlob(name=name).to_json())

    def bye(self) -> None:
        """Orderly shutdown: the keeper exits and will not restart us."""
        self.connection.send(p.Bye().to_json())

    def flush(self, timeout: float = 5.0) -> None:
        """Return once everything sent is in the keeper's socket: an fd in flight there is held by the
        kernel for the keeper even if we die right after."""
        deadline = time.monotonic() + timeout
        while self.connection.wants_write and not self.connection.closed:
            if time.monotonic() > deadline:
                raise KeeperUnavailableError("the keeper is not reading its socket")
            select.select([], [self.connection.sock], [], 0.05)
            self.connection.flush()
        if self.connection.closed:
            raise KeeperUnavailableError("the keeper went away")

    def close(self) -> None:
        self.connection.close()


def launch_keeper(paths: StatePaths, orphan_deadline: float) -> subprocess.Popen[bytes]:
    """Start a keeper without waiting: the returned launcher exits once the keeper serves."""
    return subprocess.Popen(keeper_command(paths, orphan_deadline), stdin=subprocess.DEVNULL)


def _connect(paths: StatePaths, orphan_deadline: float, spawn: bool) -> socket.socket:
    deadline = time.monotonic() + CONNECT_TIMEOUT
    launched = False
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.connect(os.fspath(paths.keeper_socket))
            return sock
        except (FileNotFoundError, ConnectionRefusedError):
            sock.close()
        if not spawn or time.monotonic() > deadline:
            raise OSError(errno.ECONNREFUSED, f"no keeper answers at {paths.keeper_socket}")
        if not launched:
            subprocess.run(keeper_command(paths, orphan_deadline), stdin=subprocess.DEVNULL, check=False,
                           timeout=CONNECT_TIMEOUT)
            launched = True
        else:
            time.sleep(0.05)


def _handshake(sock: socket.socket) -> Held:
    held = Held()
    decoder = FrameDecoder()
    sock.settimeout(HANDSHAKE_TIMEOUT)
    while True:
        data, fds = receive(sock)
        if not data:
            raise OSError(errno.ECONNRESET, "the keeper closed the connection during the handshake")
        for frame, message_fds in decoder.feed(data, fds):
            try:
                message = p.parse(frame)
            except ProtocolError as e:
                raise OSError(errno.EPROTO, f"the keeper sent a malformed message: {e}") from None
            if isinstance(message, p.Held):
                held.respawns = message.respawns
                if message_fds:
                    held.group_fd = message_fds[0]
            elif isinstance(message, p.HeldBlobs):
                held.fills.update(zip(message.names, message_fds))
            elif isinstance(message, p.HeldEnd):
                return held


class KeeperUnreachableError(Exception):
    """The keeper cannot take an fd now (it is being replaced): the request should be retried."""


class KeeperHolder:
    """The supervisor's keeper, kept alive: attached at start (handing back what a predecessor left), given
    every fd to hold, and replaced without blocking the supervisor's loop when it dies."""

    def __init__(self, paths: StatePaths, orphan_deadline: float, argv: list[str], selector: selectors.BaseSelector,
                 held_fds: Callable[[], tuple[int, Iterable[tuple[str, int]]]], counters: dict[str, int],
                 log: logging.Logger) -> None:
        """`held_fds()`: what a new keeper must hold, the group fd and (blob name, fill fd) pairs."""
        self.paths = paths
        self.orphan_deadline = orphan_deadline
        self.argv = argv
        self.selector = selector
        self.held_fds = held_fds
        self.counters = counters
        self.log = log
        self.link: KeeperLink | None = None
        self.supervisor_restarts = 0       # how often the keeper restarted a supervisor (it counts them)
        self._launcher: subprocess.Popen[bytes] | None = None
        self._stopping = False

    @property
    def pid(self) -> int:
        return self.link.pid if self.link is not None else 0

    def attach(self, *, spawn: bool) -> Held:
        """Connect (starting a keeper if `spawn`) and take back what it holds."""
        link, held = KeeperLink.connect(self.paths, self.orphan_deadline, self.argv, spawn=spawn)
        self.supervisor_restarts = held.respawns
        self.link = link
        self.selector.register(link.connection.sock, selectors.EVENT_READ, self._on_io)
        return held

    def _required(self) -> KeeperLink:
        if self.link is None:
            raise KeeperUnreachableError("the keeper is being restarted: try again in a moment")
        return self.link

    def hold_group(self, group_fd: int) -> None:
        self._required().hold_group(group_fd)

    def hold_blob(self, name: str, fill_fd: int) -> None:
        self._required().hold_blob(name, fill_fd)

    def drop_blob(self, name: str) -> None:
        if self.link is not None:
            self.link.drop_blob(name)

    def flush(self) -> None:
        """Return once all sent is in the keeper's socket (KeeperUnreachableError if it cannot be)."""
        try:
            self._required().flush()
        except KeeperUnavailableError as e:
            raise KeeperUnreachableError(f"{e}: try again in a moment") from None

    def bye(self) -> None:
        self._stopping = True
        if self.link is not None:
            self.link.bye()
            self.flush()

    def stop_replacing(self) -> None:
        """The supervisor is leaving (restart): a keeper dying now is not replaced by us."""
        self._stopping = True

    def _on_io(self, sock: socket.socket, mask: int) -> None:
        link = self.link
        if link is None:
            return
        messages = link.connection.on_ready(mask)
        if messages is None:
            self.selector.unregister(link.connection.sock)
            link.close()
            self.link = None
            if not self._stopping:
                self.counters["keeper_restarts"] += 1
                self.log.error("the keeper died: starting a new one (until then, if this supervisor "
                               "dies too, readers of unfilled ranges see zeros)")
                self.maintain()
            return
        for _frame, fds in messages:
            for fd in fds:
                os.close(fd)
        self._update_interest(link.connection)

    def _update_interest(self, connection: Connection) -> None:
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if connection.wants_write else 0)
        key = self.selector.get_key(connection.sock)
        if key.events != events:
            self.selector.modify(connection.sock, events, key.data)

    def maintain(self) -> None:
        """Replace a dead keeper without blocking the loop: launch it, connect on a later call, hand it the
        group fd and every fill fd."""
        if self.link is not None or self._stopping:
            return
        if self._launcher is None:
            self._launcher = launch_keeper(self.paths, self.orphan_deadline)
            return
        if self._launcher.poll() is None:
            return
        self._launcher = None
        try:
            held = self.attach(spawn=False)
        except OSError as e:
            self.log.error("cannot reach the new keeper: %s", e)
            return
        for fd in held.fills.values():
            os.close(fd)
        if held.group_fd is not None:
            os.close(held.group_fd)    # ours is authoritative
        link = self._required()
        group_fd, fill_fds = self.held_fds()
        link.hold_group(group_fd)
        fills = list(fill_fds)
        for name, fd in fills:
            link.hold_blob(name, fd)
        self._update_interest(link.connection)
        self.log.info("a new keeper (pid %d) holds the group and %d fill fds", link.pid, len(fills))
