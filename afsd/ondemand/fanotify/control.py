"""The fanotify supervisor's control socket: accepting connections on DIR/supervisor.sock, parsing each
request (afsd/ondemand/supervised/protocol.py) and carrying out register, unregister, status, trace, watch,
shutdown and restart; a connection whose first message is a fetch worker's Hello goes to the worker pool.

Where it sits: supervisor.py runs the loop and owns the events and tasks that a blob's unregistering or a
shutdown must answer or cancel; blobs.py owns each blob's fill fd, mark and record.
"""

from __future__ import annotations

import os
import socket
import time
from typing import TYPE_CHECKING, Any

from afsd.ondemand._wire import Connection, ProtocolError, peer_pid
from afsd.ondemand.fanotify.blobfile import BlobFileError, mounts_of
from afsd.ondemand.fanotify.blobs import RegistrationError
from afsd.ondemand.fanotify.keeperlink import KeeperUnreachableError
from afsd.ondemand.fanotify.model import Blob
from afsd.ondemand.spec import BlobSpec
from afsd.ondemand.supervised import protocol as p
from afsd.ondemand.supervised.protocol import DaemonState, Role

if TYPE_CHECKING:
    from afsd.ondemand.fanotify.supervisor import Supervisor


class ControlRequests:
    def __init__(self, supervisor: Supervisor) -> None:
        self.supervisor = supervisor

    def accept(self, listener: socket.socket, mask: int) -> None:
        while True:
            try:
                sock, _ = listener.accept()
            except BlockingIOError:
                return
            connection = Connection(sock)
            self.supervisor.links.add(connection, lambda _s, m, c=connection: self._on_io(c, m))

    def _on_io(self, connection: Connection, mask: int) -> None:
        messages = connection.on_ready(mask)
        if messages is None:
            self.supervisor.links.close(connection)
            return
        for index, (frame, fds) in enumerate(messages):
            for fd in fds:
                os.close(fd)
            try:
                message = p.parse(frame)
            except ProtocolError as e:
                request_id = frame.get("id")
                self.supervisor.links.send(connection, p.Reply(
                    id=request_id if type(request_id) is int else 0, ok=False, error=f"malformed request: {e}"))
                continue
            if isinstance(message, p.Hello) and message.role is Role.FETCH_WORKER:
                self.supervisor.pool.hello(connection, peer_pid(connection.sock), messages[index + 1:])
                return
            self._handle(connection, message)
        if not connection.closed:
            self.supervisor.links.update(connection)

    def _handle(self, connection: Connection, message: p.Message) -> None:
        reply = p.Reply(id=message.id)
        try:
            if isinstance(message, p.Register):
                blob = self.register(message.spec, message.path, message.source, message.prefetch,
                                     learned=message.learned, record=message.record)
                reply = p.Reply(id=message.id, blob=self.supervisor.blobs.status(blob))
            elif isinstance(message, p.TraceRequest):
                blob = self.supervisor.blobs.get(message.name)
                if blob is not None and message.detaching:
                    blob.leaving = True   # (before the recording closes: its close would start the fill)
                recorder = blob.recorder if blob is not None else None
                reply = p.Reply(id=message.id, trace=recorder.take(time.monotonic(), close=message.close)
                                if recorder is not None else None)
            elif isinstance(message, p.Unregister):
                self._unregister(message.name, force=message.force)
            elif isinstance(message, p.StatusRequest):
                reply = p.Reply(id=message.id, status=self.supervisor.status())
            elif isinstance(message, p.Watch):
                self.supervisor.links.watchers.add(connection)
            elif isinstance(message, p.Shutdown):
                self._shutdown(force=message.force)
            elif isinstance(message, p.Restart):
                self.supervisor.state = DaemonState.RESTARTING
            else:
                raise RegistrationError(f"unknown request {message.op!r}")
        except (RegistrationError, BlobFileError) as e:
            reply = p.Reply(id=message.id, ok=False, error=str(e))
        except ValueError as e:
            reply = p.Reply(id=message.id, ok=False, error=f"malformed {message.op} request: {e}")
        self.supervisor.links.send(connection, reply)
        if self.supervisor.state is not DaemonState.SERVING:   # the loop ends after this: deliver the reply first
            connection.sock.setblocking(True)
            connection.flush()

    def register(self, spec: BlobSpec, path: str, source: dict[str, Any], prefetch: bool, *,
                 learned: list[list[int]] | None = None, record: float = 0.0, from_record: bool = False) -> Blob:
        blob, new = self.supervisor.blobs.register(spec, path, source, prefetch, from_record=from_record)
        blob.leaving = False   # attached again (a detach that failed, or raced this): its fill may run
        if new:
            self.supervisor.learn(blob, learned or [], record)
            self.supervisor.pool.serve_everywhere(blob)
            self.supervisor.prefetch(blob)
            self.supervisor.log.info("registered blob %s (%s, %d bytes, %s)", blob.name, path, spec.size,
                                     "complete" if blob.complete else "filling on demand")
        return blob

    def _unregister(self, name: str, *, force: bool) -> None:
        blob = self.supervisor.blobs.get(name)
        if blob is None:
            raise RegistrationError(f"blob {name} is not registered")
        if not blob.complete and not force:
            mounted_at = mounts_of(blob.path)
            if mounted_at:
                raise RegistrationError(f"blob {name} is still mounted at {mounted_at[0]} and not complete: "
                                        "unmount it first (or force, and its unfilled reads fail with EIO)")
        for event in list(blob.pending):
            self.supervisor.counters["events_denied_unknown"] += 1
            self.supervisor.answer(event, allow=False)
        for task in blob.tasks():
            self.supervisor.cancel(task)
        self.supervisor.pool.forget_everywhere(blob)
        self.supervisor.inline.forget(blob)
        self.supervisor.blobs.remove(blob)
        self.supervisor.log.info("unregistered blob %s", name)

    def _shutdown(self, *, force: bool) -> None:
        busy = [b.name for b in self.supervisor.blobs if not b.complete and mounts_of(b.path)]
        if busy and not force:
            raise RegistrationError(f"blobs still mounted and incomplete: {', '.join(busy)}: unmount them "
                                    "first (stopping now would let their readers see zeros)")
        self.supervisor.log.info("shutting down in order")
        self.supervisor.state = DaemonState.STOPPING
        for event in list(self.supervisor.pending):
            self.supervisor.answer(event, allow=False)
        self.supervisor.pool.stop_all("shutting down")
        self.supervisor.pool.wait_all()
        try:
            self.supervisor.keeper.bye()
        except KeeperUnreachableError as e:
            self.supervisor.log.error("could not tell the keeper to stop: %s", e)
        for blob in self.supervisor.blobs:
            if blob.fill_fd is not None:
                os.close(blob.fill_fd)
        self.supervisor.journal.reset()
        self.supervisor.paths.supervisor_socket.unlink(missing_ok=True)
