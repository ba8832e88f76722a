"""gRPC plumbing shared by the daemons: servers and client channels (with mutual TLS when the process
has TLS material, see afsd/trust/tls.py), running a server until SIGTERM, mapping our errors to status
codes, and a small cache of client channels to peers."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import signal
import ssl
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

import grpc

from afsd import errors
from afsd.health import HEALTH
from afsd.metrics import MetricsInterceptor

if TYPE_CHECKING:
    from afsd.trust.tls import TlsConfig
    from afsd.trust.tokens import BearerTokens

log = logging.getLogger(__name__)

# Big enough for any message we send (ReadLayer caps its data at 4 MiB - 64 KiB), and explicit so
# that peers running gRPC's defaults interoperate.
MAX_MESSAGE_BYTES = 4 * 1024 * 1024
CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.enable_retries", 0),
]

_STATUS_FOR_ERROR: list[tuple[type[BaseException], grpc.StatusCode]] = [
    (errors.InvalidReferenceError, grpc.StatusCode.INVALID_ARGUMENT),
    (errors.PlatformNotFoundError, grpc.StatusCode.NOT_FOUND),
    (errors.NotFoundError, grpc.StatusCode.NOT_FOUND),
    (errors.RegistryAuthError, grpc.StatusCode.PERMISSION_DENIED),
    (errors.RegistryUnreachableError, grpc.StatusCode.UNAVAILABLE),
    (errors.DigestMismatchError, grpc.StatusCode.DATA_LOSS),
    (errors.UnsupportedMediaTypeError, grpc.StatusCode.FAILED_PRECONDITION),
    (errors.LayerFormatError, grpc.StatusCode.FAILED_PRECONDITION),
    (errors.CacheFullError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (errors.RegistryError, grpc.StatusCode.UNAVAILABLE),
]


# A service's own errors and their status codes, looked up before the common ones.
StatusTable = Sequence[tuple[type[BaseException], grpc.StatusCode]]


def status_for(error: BaseException, specific: StatusTable = ()) -> grpc.StatusCode:
    for kind, code in [*specific, *_STATUS_FOR_ERROR]:
        if isinstance(error, kind):
            return code
    return grpc.StatusCode.INTERNAL


# Trailing metadata on every refusal a handler makes: a client tells "the daemon answered UNAVAILABLE"
# (e.g. no provider of a layer, no afslet with room, draining) from "nothing answered" (no daemon at the
# address), which share the code. Extra metadata: clients that do not look for it (afs-sdk) are unaffected.
REFUSAL_KEY = "afsd-refusal"


async def refuse(context: grpc.aio.ServicerContext, code: grpc.StatusCode, message: str,
                 reason: str = "") -> NoReturn:
    """End the call with `code` and the one-line `message`, marked as this server's own answer
    (REFUSAL_KEY: `reason`, e.g. the error's class, or the code's name). Every handler ends a call this
    way, never with a bare `context.abort` (tests/test_code_rules.py checks it)."""
    await context.abort(code, message, trailing_metadata=((REFUSAL_KEY, reason or code.name),))


async def abort_for(context: grpc.aio.ServicerContext, error: errors.AfsdError,
                    specific: StatusTable = ()) -> NoReturn:
    """End the call with the status that fits `error` and its one-line message."""
    await refuse(context, status_for(error, specific), str(error), type(error).__name__)


# What gRPC says when it could not connect: the address, then the cause ("...; last error: UNKNOWN:
# ipv4:10.0.0.3:61051: Failed to connect to remote host: connect: Connection refused (111)").
_CONNECT_FAILURE = re.compile(r"^failed to connect to all addresses; last error: \w+: \S+: "
                              r"(?:Failed to connect to remote host: )?")


def failure_cause(code: grpc.StatusCode, details: str | None) -> str:
    """Why a call to a peer failed (its status and details), in a few words, for a message that already
    names the peer: gRPC's details without the address it repeats ("connect: Connection refused (111)"),
    and the status's name when it is not UNAVAILABLE ("DEADLINE_EXCEEDED: Deadline Exceeded")."""
    details = _CONNECT_FAILURE.sub("", details or "")
    if code == grpc.StatusCode.UNAVAILABLE and details:
        return details
    return f"{code.name}: {details}".rstrip(": ")


def daemon_did_not_answer(error: grpc.aio.AioRpcError) -> bool:
    """Whether a failed call never reached a handler: UNAVAILABLE without the daemon's refusal mark."""
    marks = error.trailing_metadata() or ()
    return error.code() == grpc.StatusCode.UNAVAILABLE and not any(key == REFUSAL_KEY for key, _ in marks)


# Calls a server runs at once; more are refused at once with RESOURCE_EXHAUSTED (a flood of idle streams
# cannot exhaust a daemon's memory or tasks).
MAX_CONCURRENT_RPCS = 1024
# SO_REUSEPORT is gRPC's default on Linux, stated here because `listen_on` relies on it.
SERVER_OPTIONS = [*CHANNEL_OPTIONS, ("grpc.so_reuseport", 1)]


def new_server(tls: TlsConfig | None = None, tokens: BearerTokens | None = None, *,
               maximum_concurrent_rpcs: int = MAX_CONCURRENT_RPCS) -> grpc.aio.Server:
    """A server with afsd's interceptors; with `tls`, every call is checked against the access rules
    (afsd/trust/access.py), its caller known by its certificate or, with `tokens`, by its bearer token —
    bind it with `add_port(server, address, tls, client_certificates=tokens is None)`."""
    interceptors: list[grpc.aio.ServerInterceptor] = [MetricsInterceptor()]
    if tls is not None:
        from afsd.trust.access import AccessInterceptor
        interceptors.append(AccessInterceptor(tokens=tokens))
    return grpc.aio.server(interceptors=interceptors, options=SERVER_OPTIONS,
                           maximum_concurrent_rpcs=maximum_concurrent_rpcs)


def add_port(server: grpc.aio.Server, address: str, tls: TlsConfig | None, *,
             client_certificates: bool = True) -> int:
    """Listen on `address`: with `tls`, TLS requiring a client certificate from the cluster CA (or, with
    `client_certificates` False, server-side TLS only: callers show bearer tokens); plaintext without.
    Returns the port (the kernel's pick for port 0: `afsd.readiness.with_port` makes it an address);
    UsageError when nothing could be bound. gRPC binds with SO_REUSEPORT, so a launcher may hold the
    port (afsd/lab/ports.py) while the daemon binds it, and keep it between the daemon's restarts."""
    port = server.add_secure_port(address, tls.server_credentials(require_client_certificate=client_certificates)) \
        if tls else server.add_insecure_port(address)
    if port == 0:
        raise errors.UsageError(f"cannot listen on {address}")
    return port


def open_channel(address: str, tls: TlsConfig | None = None,
                 options: list[tuple[str, int]] = CHANNEL_OPTIONS, token: str | None = None,
                 server_name: str | None = None) -> grpc.aio.Channel:
    """A client channel to `address`: TLS with `tls` (the server's certificate must come from the cluster
    CA and name the host dialled — or `server_name`, when `address` is one of the addresses that name
    resolved to; ours is presented if `tls` has one), every call carrying `token` as
    `authorization: Bearer` if given; plaintext without `tls`."""
    if tls is None:
        if token:
            raise errors.UsageError("a bearer token is sent over TLS only: give --tls-ca (or --tls-dir) too")
        return grpc.aio.insecure_channel(address, options=options)
    credentials = tls.channel_credentials()
    if token:
        credentials = grpc.composite_channel_credentials(credentials, grpc.access_token_call_credentials(token))
    if server_name:
        options = [*options, ("grpc.ssl_target_name_override", server_name)]
    return grpc.aio.secure_channel(address, credentials, options=options)


async def run_until_signalled(server: grpc.aio.Server, *, grace: float = 5.0,
                              on_stop: Iterable[Callable[[], object]] = (), started: bool = False) -> None:
    """Serve until SIGTERM/SIGINT, then stop accepting calls and give running ones `grace` seconds.

    `started`: the server is already running (e.g. from `start_unix_server`).
    """
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    if not started:
        await server.start()
    HEALTH.serving()
    try:
        await stop.wait()
    finally:
        log.info("shutting down")
        HEALTH.draining()
        for callback in on_stop:
            result = callback()
            if asyncio.iscoroutine(result):
                await result
        await server.stop(grace)
        HEALTH.stopped()


async def start_unix_server(path: Path, add_services: Callable[[grpc.aio.Server], None]) -> grpc.aio.Server:
    """A gRPC server on a unix socket that only root can reach (the socket is 0600 in a 0700 dir).

    A stale socket file from a crashed process is replaced; a live one (another daemon answering)
    is an error rather than being stolen.
    """
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    if path.exists():
        if await _socket_answers(path):
            raise errors.UsageError(f"{path} is in use by another running daemon")
        path.unlink()
    server = new_server()
    add_services(server)
    old_umask = os.umask(0o177)
    try:
        if server.add_insecure_port(f"unix:{path}") == 0:
            raise errors.UsageError(f"cannot listen on unix socket {path}")
        await server.start()
    finally:
        os.umask(old_umask)
    os.chmod(path, 0o600)
    return server


async def _socket_answers(path: Path) -> bool:
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(str(path)), 1.0)
    except (OSError, asyncio.TimeoutError):
        return False
    writer.close()
    return True


def unreachable_hint(error: grpc.aio.AioRpcError, tls: TlsConfig | None) -> str:
    """What to check when a call failed before reaching the server: with mutual TLS a refused handshake
    (no certificate, another CA, a server certificate not naming the host dialled) looks like that."""
    if not daemon_did_not_answer(error):
        return ""
    if tls is None:
        return " (if it runs with mutual TLS, give --tls-dir with a certificate from its cluster CA)"
    who = f"as {tls.identity.name}" if tls.has_certificate else "without a certificate"
    return f" (TLS {who}: its certificate must come from the CA in {tls.ca_path}, and ours, if it asks, from its CA)"


class ChannelPool:
    """One channel per peer address (mutual TLS with `tls`), reused across calls (gRPC multiplexes on it).

    `data_tls`: the TLS settings for byte-stream data connections to layerstores whose data listener
    speaks TLS (afsd/cluster/bytestream_client.py; None: such listeners are read with ReadLayer instead);
    made from `tls` when given.
    """

    channel_options: list[tuple[str, int]] = CHANNEL_OPTIONS   # a subclass may tune them
    data_tls: ssl.SSLContext | None = None

    def __init__(self, tls: TlsConfig | None = None) -> None:
        self.tls = tls
        if tls is not None:
            self.data_tls = tls.ssl_client_context()
        self._channels: dict[str, grpc.aio.Channel] = {}

    def get(self, address: str, *, server_name: str | None = None) -> grpc.aio.Channel:
        """The channel to `address`; `server_name`: the DNS name `address` was resolved from, which the
        server's certificate must name (replicas behind one Service share a certificate for its name,
        not for each pod's IP)."""
        key = f"{address}#{server_name}" if server_name else address
        channel = self._channels.get(key)
        if channel is None:
            channel = open_channel(address, self.tls, self.channel_options, server_name=server_name)
            self._channels[key] = channel
        return channel

    async def discard(self, address: str) -> None:
        channel = self._channels.pop(address, None)
        if channel is not None:
            await channel.close()

    async def close(self) -> None:
        channels, self._channels = list(self._channels.values()), {}
        for channel in channels:
            await channel.close()
