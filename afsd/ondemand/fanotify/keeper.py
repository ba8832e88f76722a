"""The keeper: a second holder of the fanotify group fd and of every blob's fill fd.

Where it sits: node daemon -> supervisor (events, fills, workers) <-> keeper (holds fds, nothing else).

Why: when the last holder of a fanotify group fd dies, the kernel answers every pending pre-content
event with FAN_ALLOW and removes the marks, and readers silently read the holes' zeros (measured; see
docs/fanotify-backend.md). The keeper holds a duplicate of the group fd so that a crashed supervisor
does not release the group: pending reads stay blocked, the marks stay, and the keeper starts a new
supervisor, which takes the fds back and answers what its predecessor left (journal.py). It also holds
the fill fds, which cannot be reopened once a blob is marked (an fd's notification mode is fixed when
it is opened, and one opened on a marked file raises events on its own writes).

It is deliberately tiny: no network, no fetching, no parsing of anything but its own socket. Its one
active duty besides holding fds: if no supervisor has come back within `--orphan-deadline` seconds, it
answers every event itself with FAN_DENY|EIO (readers fail loudly instead of hanging) until one does.
If the keeper dies, the supervisor starts a new one and hands the fds over again; only when both die
at once does the kernel release the group.

Messages (afsd/ondemand/supervised/protocol.py) from the supervisor ("holder"): Hello(SUPERVISOR, argv,
env) -> Held (+ group fd), HeldBlobs (+ fill fds)..., HeldEnd; HoldGroup (+ fd), HoldBlob (+ fd), DropBlob,
Bye (orderly shutdown: exit without restarting the supervisor). Anyone may send a StatusRequest.
"""

from __future__ import annotations

import argparse
import errno
import os
import selectors
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from afsd.ondemand import _daemon
from afsd.ondemand._wire import MAX_FDS_PER_FRAME, Connection, ProtocolError, peer_pid
from afsd.ondemand.fanotify import _sys
from afsd.ondemand.fanotify.journal import slot_count
from afsd.ondemand.fanotify.paths import StatePaths
from afsd.ondemand.supervised import protocol as p

HELLO_TIMEOUT = 10.0          # a started supervisor that has not said hello by then is started again
MIN_RESPAWN_DELAY = 0.05
MAX_RESPAWN_DELAY = 5.0
CRASH_LOOP_SECONDS = 5.0     # a supervisor that dies sooner than this after starting is restarted more slowly


class Keeper:
    def __init__(self, paths: StatePaths, orphan_deadline: float) -> None:
        self.paths = paths
        self.orphan_deadline = orphan_deadline
        self.log = _daemon.setup_logging("keeper")
        self.selector = selectors.DefaultSelector()
        self.group_fd: int | None = None
        self.fill_fds: dict[str, int] = {}
        self.holder: Connection | None = None
        self.holder_pid = 0
        self.holder_since = 0.0
        self.waiting: list[tuple[Connection, p.Hello]] = []
        self.argv: list[str] | None = None
        self.env: dict[str, str] | None = None
        self.respawns = 0
        self.respawn_delay = MIN_RESPAWN_DELAY
        self.respawn_at: float | None = None
        self.holder_lost_at: float | None = None
        self.denying = False
        self.orphan_denied = 0
        self.running = True

    # -- lifecycle ---------------------------------------------------------------------------------

    def serve(self, listener: socket.socket) -> None:
        self.selector.register(listener, selectors.EVENT_READ, self._accept)
        while self.running:
            for key, mask in self.selector.select(self._timeout()):
                key.data(key.fileobj, mask)
            self._timers()
        self.selector.close()

    def _timeout(self) -> float | None:
        deadlines = []
        if self.respawn_at is not None:
            deadlines.append(self.respawn_at)
        if self._orphaned() and not self.denying and self.holder_lost_at is not None:
            deadlines.append(self.holder_lost_at + self.orphan_deadline)
        return None if not deadlines else max(0.0, min(deadlines) - time.monotonic())

    def _orphaned(self) -> bool:
        return self.holder is None and self.group_fd is not None

    def _timers(self) -> None:
        now = time.monotonic()
        if self.respawn_at is not None and now >= self.respawn_at:
            self._respawn()
        if (self._orphaned() and not self.denying and self.holder_lost_at is not None
                and now >= self.holder_lost_at + self.orphan_deadline):
            self._start_denying()

    # -- connections -------------------------------------------------------------------------------

    def _accept(self, listener: socket.socket, mask: int) -> None:
        try:
            sock, _ = listener.accept()
        except BlockingIOError:
            return
        connection = Connection(sock)
        self.selector.register(sock, selectors.EVENT_READ, lambda _s, m, c=connection: self._on_io(c, m))

    def _on_io(self, connection: Connection, mask: int) -> None:
        messages = connection.on_ready(mask)
        if messages is None:
            self._drop(connection)
            return
        for frame, fds in messages:
            try:
                message = p.parse(frame)
            except ProtocolError as e:
                self.log.error("ignoring a malformed message: %s", e)
                for fd in fds:
                    os.close(fd)
                continue
            self._handle(connection, message, fds)
        self._update_interest(connection)

    def _update_interest(self, connection: Connection) -> None:
        if connection.closed:
            return
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if connection.wants_write else 0)
        self.selector.modify(connection.sock, events, self.selector.get_key(connection.sock).data)

    def _drop(self, connection: Connection) -> None:
        try:
            self.selector.unregister(connection.sock)
        except (KeyError, ValueError):
            pass
        connection.close()
        self.waiting = [(c, m) for c, m in self.waiting if c is not connection]
        if connection is self.holder:
            self.holder = None
            self.holder_lost_at = time.monotonic()
            lived = self.holder_lost_at - self.holder_since
            self.log.warning("supervisor %d went away without saying bye (after %.1f s)", self.holder_pid, lived)
            self.respawn_delay = (MIN_RESPAWN_DELAY if lived > CRASH_LOOP_SECONDS
                                  else min(MAX_RESPAWN_DELAY, self.respawn_delay * 2))
            if self.waiting:
                waiting_connection, hello = self.waiting.pop(0)
                self._take_holder(waiting_connection, hello)
            elif self.argv is not None:
                self.respawn_at = time.monotonic() + self.respawn_delay

    def _handle(self, connection: Connection, message: p.Message, fds: list[int]) -> None:
        if isinstance(message, p.StatusRequest):
            connection.send(p.Reply(id=message.id, keeper=self.status()).to_json())
        elif isinstance(message, p.Hello) and message.role is p.Role.SUPERVISOR:
            if self.holder is None:
                self._take_holder(connection, message)
            else:
                self.waiting.append((connection, message))  # served once the current holder is gone
        elif connection is not self.holder:
            self.log.error("ignoring %r from a connection that is not the supervisor", message.op)
        elif isinstance(message, p.HoldGroup):
            self._replace_group(fds[0] if fds else None)
            fds = fds[1:]
        elif isinstance(message, p.HoldBlob) and fds:
            old = self.fill_fds.pop(message.name, None)
            if old is not None:
                os.close(old)
            self.fill_fds[message.name] = fds[0]
            fds = fds[1:]
        elif isinstance(message, p.DropBlob):
            old = self.fill_fds.pop(message.name, None)
            if old is not None:
                os.close(old)
        elif isinstance(message, p.Bye):
            self.log.info("supervisor %d shut down in order: exiting", self.holder_pid)
            self.running = False
            connection.send(p.Bye().to_json())
            connection.sock.setblocking(True)
            connection.flush()
        for fd in fds:  # anything not claimed above
            os.close(fd)

    def _take_holder(self, connection: Connection, hello: p.Hello) -> None:
        if self.denying:
            self._stop_denying()
        self.holder = connection
        self.holder_pid = peer_pid(connection.sock)
        self.holder_since = time.monotonic()
        self.respawn_at = None
        if hello.argv:
            self.argv = list(hello.argv)
            self.env = dict(hello.env)
        names = sorted(self.fill_fds)
        connection.send(p.Held(group=self.group_fd is not None, blobs=len(names), respawns=self.respawns,
                               orphan_denied=self.orphan_denied).to_json(),
                        [self.group_fd] if self.group_fd is not None else [])
        for start in range(0, len(names), MAX_FDS_PER_FRAME):
            batch = names[start:start + MAX_FDS_PER_FRAME]
            connection.send(p.HeldBlobs(names=batch).to_json(), [self.fill_fds[n] for n in batch])
        connection.send(p.HeldEnd().to_json())
        self.log.info("supervisor %d holds the group again (%d blobs)", self.holder_pid, len(names))

    def _replace_group(self, fd: int | None) -> None:
        if self.group_fd is not None and self.group_fd != fd:
            if self.denying:
                self._stop_denying()
            os.close(self.group_fd)
        self.group_fd = fd

    # -- restarting the supervisor -----------------------------------------------------------------

    def _respawn(self) -> None:
        if self.argv is None:   # no supervisor said how to start it again
            self.respawn_at = None
            return
        self.respawns += 1
        self.respawn_at = time.monotonic() + max(HELLO_TIMEOUT, self.respawn_delay)
        log = os.open(self.paths.supervisor_log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            process = subprocess.Popen(self.argv, env=self.env, stdin=subprocess.DEVNULL, stdout=log,
                                       stderr=log, start_new_session=True, close_fds=True)
        except OSError as e:
            self.log.error("cannot start the supervisor (%s): %s", " ".join(self.argv), e)
            self.respawn_at = time.monotonic() + MAX_RESPAWN_DELAY
            return
        finally:
            os.close(log)
        self.log.warning("started supervisor %d (restart %d)", process.pid, self.respawns)

    # -- nobody came back: fail readers loudly -----------------------------------------------------

    def _start_denying(self) -> None:
        if self.group_fd is None:   # nothing to deny for
            return
        self.denying = True
        limit = slot_count(self.paths.journal, 65536)
        swept = _sys.sweep_unanswered(self.group_fd, limit)
        self.orphan_denied += len(swept)
        self.log.error("no supervisor for %.0f s: answering every event with EIO (%d pending ones failed)",
                       self.orphan_deadline, len(swept))
        self.selector.register(self.group_fd, selectors.EVENT_READ, self._deny_events)

    def _stop_denying(self) -> None:
        self.denying = False
        if self.group_fd is not None:
            self.selector.unregister(self.group_fd)

    def _deny_events(self, fd: int, mask: int) -> None:
        while True:
            try:
                data = os.read(fd, 1 << 16)
            except BlockingIOError:
                return
            for event in _sys.parse_events(data):
                if event.fd >= 0:
                    _sys.respond(fd, event.fd, False, errno.EIO)
                    os.close(event.fd)
                    self.orphan_denied += 1

    def status(self) -> p.KeeperStatus:
        return p.KeeperStatus(pid=os.getpid(), holder_pid=self.holder_pid if self.holder else 0,
                              group=self.group_fd is not None, blobs=sorted(self.fill_fds), respawns=self.respawns,
                              denying=self.denying, orphan_denied=self.orphan_denied)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m afsd.ondemand.fanotify.keeper", description=__doc__.split("\n")[0])
    parser.add_argument("--state-dir", required=True, type=Path)
    parser.add_argument("--orphan-deadline", type=float, default=30.0,
                        help="seconds without a supervisor before the keeper fails events itself (EIO)")
    parser.add_argument("--daemon", action="store_true", help="detach; exit once serving")
    args = parser.parse_args(argv)
    paths = StatePaths(args.state_dir)
    paths.ensure()
    announce = _daemon.detach_if(args.daemon, paths.keeper_log)
    lock = _daemon.try_lock(paths.keeper_lock)
    if lock is None:
        print(f"a keeper already runs for {paths.root}", file=sys.stderr)
        announce(True)   # the caller wanted one running: there is one
        return 0
    _daemon.protect_from_oom_killer()
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # restarted supervisors are reaped by the kernel
    listener = paths.listen(paths.keeper_socket)
    keeper = Keeper(paths, args.orphan_deadline)
    keeper.log.info("keeping fds for %s", paths.root)
    announce(True)
    try:
        keeper.serve(listener)
    finally:
        paths.keeper_socket.unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
