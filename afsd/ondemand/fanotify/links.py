"""The fanotify supervisor's sockets in its selector loop: sending typed messages and keeping each socket's
interest (read, plus write while output is queued) right, written once for workers, clients, watchers and
the keeper. The loop itself is in supervisor.py."""

from __future__ import annotations

import selectors
from collections.abc import Callable
from typing import Any

from afsd.ondemand._wire import Connection
from afsd.ondemand.supervised.protocol import Message

Handler = Callable[[Any, int], None]


class Links:
    def __init__(self, selector: selectors.BaseSelector) -> None:
        self.selector = selector
        self.watchers: set[Connection] = set()   # clients that asked to Watch

    def add(self, connection: Connection, handler: Handler) -> None:
        self.selector.register(connection.sock, selectors.EVENT_READ, handler)

    def rebind(self, connection: Connection, handler: Handler) -> None:
        """Deliver this connection's readiness to `handler` from now on (a client that turned out a worker)."""
        self.selector.modify(connection.sock, selectors.EVENT_READ, handler)
        self.update(connection)

    def send(self, connection: Connection, message: Message, fds: list[int] | None = None) -> None:
        connection.send(message.to_json(), fds)
        self.update(connection)

    def update(self, connection: Connection) -> None:
        """Watch for writability exactly while output waits; close a connection that broke."""
        if connection.closed:
            self.close(connection)
            return
        try:
            key = self.selector.get_key(connection.sock)
        except (KeyError, ValueError):
            return
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if connection.wants_write else 0)
        if key.events != events:
            self.selector.modify(connection.sock, events, key.data)

    def close(self, connection: Connection) -> None:
        self.watchers.discard(connection)
        try:
            self.selector.unregister(connection.sock)
        except (KeyError, ValueError):
            pass
        if connection.sock.fileno() >= 0:
            connection.close()
