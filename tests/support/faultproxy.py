"""An HTTP proxy in front of a real registry that misbehaves on cue (the one fake in these tests).

A real `docker-registry` cannot be made to answer 503 twice, drop a connection, corrupt a blob or
redirect to another host when a test wants it; this proxy can. Requests that match no rule are
forwarded to the upstream registry unchanged (apart from optional upstream headers, used to play
a blob store that authorises by URL), and every request is recorded with its headers.
"""

from __future__ import annotations

import http.client
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler

from tests.support.httpserver import BackgroundHTTPServer

_HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailers",
               "transfer-encoding", "upgrade", "content-length", "host"}


@dataclass(frozen=True)
class RecordedRequest:
    method: str
    path: str
    headers: dict[str, str]  # names lower-cased


@dataclass
class _Rule:
    method: str | None
    path: re.Pattern[str]
    action: str  # respond | drop | truncate | corrupt | redirect | serve
    times: int | None  # None: every matching request
    status: int = 503
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    location: str = ""


class FaultProxy(BackgroundHTTPServer):
    """`FaultProxy(upstream="127.0.0.1:5000")`; start with `start()` or as a context manager."""

    def __init__(self, upstream: str, *, upstream_headers: dict[str, str] | None = None) -> None:
        self.upstream = upstream
        self.upstream_headers = dict(upstream_headers or {})
        self._rules: list[_Rule] = []
        self._lock = threading.Lock()
        self._requests: list[RecordedRequest] = []
        super().__init__(self._handler_class())

    @property
    def requests(self) -> list[RecordedRequest]:
        with self._lock:
            return list(self._requests)

    def requests_to(self, pattern: str) -> list[RecordedRequest]:
        return [r for r in self.requests if re.search(pattern, r.path)]

    # -- rules: the first matching rule with uses left applies --------------------------------

    def _add(self, path: str, action: str, times: int | None, method: str | None = "GET", **kw: object) -> None:
        with self._lock:
            self._rules.append(_Rule(method, re.compile(path), action, times, **kw))  # type: ignore[arg-type]

    def fail(self, path: str, *, status: int = 503, times: int | None = None,
             headers: dict[str, str] | None = None) -> None:
        """Answer `status` (with `headers`) instead of forwarding."""
        self._add(path, "respond", times, status=status, headers=headers or {})

    def drop(self, path: str, *, times: int | None = None) -> None:
        """Close the connection without answering."""
        self._add(path, "drop", times)

    def truncate(self, path: str, *, times: int | None = None) -> None:
        """Forward, but send only half of the body (with the full Content-Length) and hang up."""
        self._add(path, "truncate", times)

    def corrupt(self, path: str, *, times: int | None = None) -> None:
        """Forward, flipping one byte in the middle of the body (headers untouched)."""
        self._add(path, "corrupt", times)

    def redirect(self, path: str, to: str, *, times: int | None = None) -> None:
        """Answer 307 to `to` + the request path (e.g. `http://127.0.0.1:5001`)."""
        self._add(path, "redirect", times, location=to)

    def serve(self, path: str, body: bytes, *, headers: dict[str, str] | None = None,
              times: int | None = None) -> None:
        """Answer 200 with `body` instead of forwarding."""
        self._add(path, "serve", times, status=200, body=body, headers=headers or {})

    def _take_rule(self, method: str, path: str) -> _Rule | None:
        with self._lock:
            for rule in self._rules:
                if (rule.method in (None, method)) and rule.path.search(path) and rule.times != 0:
                    if rule.times is not None:
                        rule.times -= 1
                    return rule
        return None

    # -- lifecycle ------------------------------------------------------------------------------

    # -- serving ----------------------------------------------------------------------------------

    def _forward(self, method: str, path: str, headers: dict[str, str],
                 body: bytes) -> tuple[int, str, list[tuple[str, str]], bytes]:
        host, _, port = self.upstream.rpartition(":")
        connection = http.client.HTTPConnection(host, int(port), timeout=30)
        try:
            outgoing = {k: v for k, v in headers.items() if k.lower() not in _HOP_BY_HOP}
            outgoing.update(self.upstream_headers)
            connection.request(method, path, body=body or None, headers=outgoing)
            response = connection.getresponse()
            payload = response.read()
            kept = [(k, v) for k, v in response.getheaders() if k.lower() not in _HOP_BY_HOP]
            return response.status, response.reason, kept, payload
        finally:
            connection.close()

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def _send(self, status: int, headers: list[tuple[str, str]], body: bytes, *,
                      declared: int | None = None) -> None:
                self.send_response(status)
                for name, value in headers:
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(body) if declared is None else declared))
                self.send_header("Connection", "close")
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def _handle(self) -> None:
                self.close_connection = True
                headers = {k: v for k, v in self.headers.items()}
                with proxy._lock:
                    proxy._requests.append(RecordedRequest(self.command, self.path,
                                                           {k.lower(): v for k, v in headers.items()}))
                length = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(length) if length else b""
                rule = proxy._take_rule(self.command, self.path)
                action = rule.action if rule else "forward"
                if action == "drop":
                    return
                if action == "respond":
                    self._send(rule.status, list(rule.headers.items()), b"")
                    return
                if action == "serve":
                    self._send(200, list(rule.headers.items()), rule.body)
                    return
                if action == "redirect":
                    self._send(307, [("Location", rule.location + self.path)], b"")
                    return
                status, _, response_headers, payload = proxy._forward(self.command, self.path, headers, body)
                if action == "corrupt" and payload:
                    middle = len(payload) // 2
                    payload = payload[:middle] + bytes([payload[middle] ^ 0x01]) + payload[middle + 1:]
                if action == "truncate":
                    self._send(status, response_headers, payload[: len(payload) // 2], declared=len(payload))
                    return
                self._send(status, response_headers, payload)

            do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = _handle

            def log_message(self, format: str, *args: object) -> None:
                pass

        return Handler
