"""Errors of the proxy that reach clients, each with the gRPC status it ends a call with and the
outcome it is counted under in `afsd_proxy_dispatches_total`."""

from __future__ import annotations

import grpc

from afsd.errors import AfsdError


def unreachable(address: str, cause: str) -> str:
    """An afslet that did not answer, as every proxy message names it (`cause`: afsd.rpc.failure_cause)."""
    return f"cannot reach afslet {address}: {cause}"


class ProxyError(AfsdError):
    """A call the proxy ends: `code` is the gRPC status the client sees, `outcome` the metrics label."""

    def __init__(self, message: str, code: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE,
                 outcome: str = "exhausted") -> None:
        super().__init__(message)
        self.code = code
        self.outcome = outcome


class TargetResolveError(ProxyError):
    """A `HOST:PORT` target whose host name does not resolve (or resolves to nothing)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, grpc.StatusCode.UNAVAILABLE, "unresolved")


class RetryableDispatchError(ProxyError):
    """One dispatch attempt failed in a way a later attempt may not: no room, refused, unreachable.

    `reason` labels the retry in the metrics (no_backends, unreachable, no_room, refused, handshake).
    """

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message, grpc.StatusCode.UNAVAILABLE, "exhausted")
        self.reason = reason
