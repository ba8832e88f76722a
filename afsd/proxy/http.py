"""The proxy's HTTP endpoint (`--http-listen`): `GET /status` (JSON dispatch counts, see peers.py),
`GET /metrics` (Prometheus), `GET /healthz` and `/readyz` (afsd/health.py). A few lines of HTTP/1.1 on
asyncio: one request per connection, no body."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from urllib.parse import parse_qs, urlsplit

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from afsd import health

log = logging.getLogger(__name__)

StatusHandler = Callable[[bool], Awaitable[dict]]
_TRUE = {"1", "t", "true"}
_REQUEST_TIMEOUT = 10.0


def parse_include_cluster(values: list[str]) -> bool:
    """The reference's rule: absent or empty → true; `1`/`t`/`true` (any case) → true; anything else → false."""
    if not values or values[0] == "":
        return True
    return values[0].lower() in _TRUE


async def serve_http(host: str, port: int, status: StatusHandler) -> asyncio.AbstractServer:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            code, content_type, body = await asyncio.wait_for(_answer(reader, status), _REQUEST_TIMEOUT)
        except (TimeoutError, ValueError, ConnectionError, asyncio.IncompleteReadError):
            writer.close()
            return
        head = (f"HTTP/1.1 {code}\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
                "Connection: close\r\n\r\n")
        try:
            writer.write(head.encode() + body)
            await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    return await asyncio.start_server(handle, host, port)


async def _answer(reader: asyncio.StreamReader, status: StatusHandler) -> tuple[str, str, bytes]:
    request_line = (await reader.readline()).decode("latin-1").split()
    while (await reader.readline()).strip():
        pass  # headers: nothing here needs them
    if len(request_line) != 3:
        return "400 Bad Request", "text/plain", b"bad request\n"
    method, target = request_line[0], urlsplit(request_line[1])
    if method != "GET":
        return "405 Method Not Allowed", "text/plain", b"only GET\n"
    if target.path == "/status":
        include_cluster = parse_include_cluster(parse_qs(target.query, keep_blank_values=True).get("include_cluster", []))
        report = await status(include_cluster)
        return "200 OK", "application/json", json.dumps(report).encode() + b"\n"
    if target.path == "/metrics":
        return "200 OK", CONTENT_TYPE_LATEST, generate_latest()
    if target.path in health.PATHS:
        code, body = await asyncio.to_thread(health.answer, target.path)  # it waits on this very loop
        return ("200 OK" if code == 200 else "503 Service Unavailable"), "text/plain", body
    return "404 Not Found", "text/plain", b"not found: try /status, /metrics, /healthz or /readyz\n"
