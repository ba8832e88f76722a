"""The supervisor's side of the keeper protocol (keeper.py): find or start the keeper, take back what
it holds, and hand it every fd it must hold from then on."""

from __future__ import annotations

import errno
import os
import select
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field

from afsd.ondemand._wire import Connection, FrameDecoder, peer_pid, receive, send_blocking
from afsd.ondemand.fanotify.paths import StatePaths

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
            send_blocking(sock, {"op": "hello", "argv": argv, "env": dict(os.environ)})
            held = _handshake(sock)
        except BaseException:
            sock.close()
            raise
        return cls(sock), held

    def hold_group(self, group_fd: int) -> None:
        self.connection.send({"op": "hold_group"}, [group_fd])

    def hold_blob(self, name: str, fill_fd: int) -> None:
        self.connection.send({"op": "hold_blob", "name": name}, [fill_fd])

    def drop_blob(self, name: str) -> None:
        self.connection.send({"op": "drop_blob", "name": name})

    def bye(self) -> None:
        """Orderly shutdown: the keeper exits and will not restart us."""
        self.connection.send({"op": "bye"})

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
        for message, message_fds in decoder.feed(data, fds):
            if message["op"] == "held":
                held.respawns = int(message.get("respawns", 0))
                if message_fds:
                    held.group_fd = message_fds[0]
            elif message["op"] == "held_blobs":
                held.fills.update(zip(message["names"], message_fds))
            elif message["op"] == "held_end":
                return held
