"""Prometheus metrics shared by every daemon: an HTTP endpoint and per-RPC counters for gRPC servers.

Each daemon process serves `/metrics` on `--metrics-listen HOST:PORT`. RPC metrics are labelled by
service method and status code only, so their cardinality stays bounded whatever the traffic.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import grpc
from prometheus_client import Counter, Histogram, make_wsgi_app

RPC_REQUESTS = Counter("afsd_rpc_requests_total", "gRPC calls handled, by method and status code",
                       ["method", "code"])
RPC_LATENCY = Histogram("afsd_rpc_duration_seconds", "gRPC call duration (streams: until the last message)",
                        ["method"],
                        buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 120))


def parse_listen(address: str) -> tuple[str, int]:
    """`HOST:PORT` or `[v6]:PORT` -> (host, port)."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"invalid listen address {address!r}: expected HOST:PORT")
    return host.strip("[]") or "0.0.0.0", int(port)


class _MetricsServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # scrapes and probes are not news
        pass


def serve_metrics(address: str) -> str:
    """Start the `/metrics` HTTP endpoint, with `/healthz` and `/readyz` (afsd/health.py), in a background
    thread (never blocks the event loop); return the address it bound (`HOST:0` picks a free port)."""
    from afsd.errors import UsageError
    from afsd.health import wsgi_app
    from afsd.readiness import with_port

    try:
        host, port = parse_listen(address)
        server_class = type("_Server", (_MetricsServer,), {"address_family": socket.AF_INET6 if ":" in host
                                                           else socket.AF_INET})
        server = make_server(host, port, wsgi_app(make_wsgi_app()), server_class, handler_class=_QuietHandler)
    except (OSError, ValueError) as error:
        raise UsageError(f"cannot serve metrics on --metrics-listen {address}: {error}") from None
    threading.Thread(target=server.serve_forever, name="metrics http", daemon=True).start()
    return with_port(address, server.server_port)


def _code_of(context: grpc.aio.ServicerContext, error: BaseException | None) -> str:
    if isinstance(error, asyncio.CancelledError):
        return grpc.StatusCode.CANCELLED.name
    if error is not None and not isinstance(error, grpc.aio.AbortError):
        return grpc.StatusCode.UNKNOWN.name
    code = context.code()
    if code is None:
        return grpc.StatusCode.OK.name
    return code.name if isinstance(code, grpc.StatusCode) else str(code)


class MetricsInterceptor(grpc.aio.ServerInterceptor):
    """Counts every call and observes its duration, for unary and server-streaming methods alike."""

    async def intercept_service(self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
                                handler_call_details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method

        def finish(context: grpc.aio.ServicerContext, started: float, error: BaseException | None) -> None:
            RPC_REQUESTS.labels(method, _code_of(context, error)).inc()
            RPC_LATENCY.labels(method).observe(time.perf_counter() - started)

        if handler.unary_unary:
            inner_uu = handler.unary_unary

            async def unary_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
                started = time.perf_counter()
                try:
                    response = await inner_uu(request, context)
                except BaseException as error:
                    finish(context, started, error)
                    raise
                finish(context, started, None)
                return response

            return grpc.unary_unary_rpc_method_handler(
                unary_unary, request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)

        def wrap_stream(inner: Callable[..., AsyncIterator[Any]]) -> Callable[..., Awaitable[None]]:
            # A coroutine handler writing with context.write, not an async generator: gRPC consumes a
            # generator handler with a plain loop and never closes it when the client goes away
            # (grpc/grpc#42295), so the handler's `finally` (cancel the afslet's call, stop the command,
            # release its share) would wait for the garbage collector. Here a cancelled write raises in
            # this coroutine and `aclosing` runs the handler's cleanup at once.
            async def streaming(request: Any, context: grpc.aio.ServicerContext) -> None:
                started = time.perf_counter()
                try:
                    async with contextlib.aclosing(inner(request, context)) as responses:
                        async for response in responses:
                            await context.write(response)
                except BaseException as error:
                    finish(context, started, error)
                    raise
                finish(context, started, None)
            return streaming

        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                wrap_stream(handler.unary_stream), request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)
        if handler.stream_stream:
            return grpc.stream_stream_rpc_method_handler(
                wrap_stream(handler.stream_stream), request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)
        return handler
