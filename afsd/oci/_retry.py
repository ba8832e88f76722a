"""Retrying registry requests, and turning transport failures into one-line user errors.

Used by the registry client and the token fetcher: an operation (one HTTP exchange, or one whole
blob download) is retried under the shared policy (afsd.retry: exponential backoff with jitter) when
the server says "later" (429, honouring Retry-After up to a cap), fails on its side (5xx), or the
connection drops mid-way. A refused connection or a failed TLS handshake is not retried: the caller
falls back to the next mirror at once, and the user gets an error naming host and port.
"""

from __future__ import annotations

import email.utils
import os
import socket
import ssl
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import httpx

from afsd.errors import RegistryError, RegistryUnreachableError
from afsd.retry import RetryPolicy, http_retryable

T = TypeVar("T")

MAX_RETRY_AFTER = 30.0
# The connection broke after it was made: worth another try.
_TRANSIENT = (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError, httpx.ReadTimeout,
              httpx.WriteTimeout, httpx.PoolTimeout)


class RetryableStatus(Exception):
    """Raised by an operation when the server answered with a status worth retrying."""

    def __init__(self, response: httpx.Response, subject: str) -> None:
        super().__init__(f"HTTP {response.status_code} {response.reason_phrase} for {subject}")
        self.status = response.status_code
        self.retry_after = retry_after_seconds(response.headers.get("retry-after"))


def should_retry(status: int) -> bool:
    return http_retryable(status)


def retry_after_seconds(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a Retry-After header (delta seconds or HTTP date), capped."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        seconds = float(value)
    else:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        seconds = when.timestamp() - (time.time() if now is None else now)
    return min(max(seconds, 0.0), MAX_RETRY_AFTER)


def _causes(exc: BaseException) -> list[BaseException]:
    chain: list[BaseException] = []
    seen: BaseException | None = exc
    while seen is not None and seen not in chain:
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    return chain


def _reason(exc: BaseException) -> str:
    """The most telling cause: httpx says only "All connection attempts failed" for a refusal."""
    for cause in _causes(exc):
        if isinstance(cause, socket.gaierror) and cause.strerror:
            return f"cannot resolve the name ({cause.strerror})"
        if isinstance(cause, OSError) and not isinstance(cause, ssl.SSLError) and (cause.errno or 0) > 0:
            return os.strerror(cause.errno).lower()
    return str(exc) or type(exc).__name__


def unreachable(exc: httpx.TransportError, host: str, what: str) -> RegistryUnreachableError:
    """A one-line error for a connection that could not be made to `host` (`host[:port]`)."""
    shown = host
    try:
        url = exc.request.url
        if url.port is None:  # name the port even when it is the scheme's default
            shown = f"{host} (port {443 if url.scheme == 'https' else 80})"
    except RuntimeError:  # no request attached to the exception
        pass
    reason = _reason(exc)
    if any(isinstance(cause, ssl.SSLError) for cause in _causes(exc)):
        return RegistryUnreachableError(
            f"cannot make a TLS connection to {what} {shown} ({reason}); if it serves plain HTTP, "
            f"allow that with --insecure-registry {host}")
    return RegistryUnreachableError(f"cannot connect to {what} {shown}: {reason}")


async def with_retries(operation: Callable[[], Awaitable[T]], *, host: str, what: str,
                       attempts: int, backoff_base: float) -> T:
    """Run `operation`, retrying transient failures; `what` and `host` name the server in errors."""
    policy = RetryPolicy(attempts=attempts, base=backoff_base)
    try:
        return await policy.run(
            operation, retryable=lambda error: isinstance(error, (RetryableStatus, *_TRANSIENT)),
            delay_for=lambda error, _: error.retry_after if isinstance(error, RetryableStatus) else None)
    except RetryableStatus as exc:
        raise RegistryError(f"{what} {host} answered {exc}; gave up after {attempts} attempts") from None
    except _TRANSIENT as exc:
        raise RegistryUnreachableError(
            f"connection to {what} {host} failed ({exc or type(exc).__name__}); "
            f"gave up after {attempts} attempts") from None
    except httpx.TransportError as exc:  # refused, unresolvable, TLS: not worth retrying
        raise unreachable(exc, host, what) from None
    except httpx.RequestError as exc:  # too many redirects, undecodable body, ...
        raise RegistryError(f"request to {what} {host} failed: {exc or type(exc).__name__}") from None
