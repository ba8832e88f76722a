"""A threaded HTTP server on a free loopback port, run in the background for the test's duration.

Base of the token server and the fault-injection proxy: both must keep answering while the test's
event loop is busy in the client under test, so they run in their own threads.
"""

from __future__ import annotations

import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: object, client_address: object) -> None:
        # Clients hanging up mid-answer is normal here: some tests provoke exactly that.
        if not isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            super().handle_error(request, client_address)


class BackgroundHTTPServer:
    """Subclasses pass their request handler class; `start()`/`stop()` or use as a context manager."""

    def __init__(self, handler_class: type[BaseHTTPRequestHandler]) -> None:
        self._server = _QuietServer(("127.0.0.1", 0), handler_class)
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> str:
        """`127.0.0.1:PORT`."""
        host, port = self._server.server_address[:2]
        return f"{host}:{port}"

    def start(self):  # noqa: ANN201 (returns the subclass instance)
        # A short poll interval keeps stop() quick (shutdown waits for the next poll).
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), name=type(self).__name__,
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join()
            self._thread = None
        self._server.server_close()

    def __enter__(self):  # noqa: ANN204
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
