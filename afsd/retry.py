"""The one retry policy of every internal client: what is worth retrying, and how long to wait.

Retried: failures that say "not now" or "not this connection" — gRPC UNAVAILABLE, DEADLINE_EXCEEDED,
ABORTED; HTTP 429 and 5xx; connections reset mid-way. Never retried: answers that would be the same
next time — INVALID_ARGUMENT, NOT_FOUND, PERMISSION_DENIED, FAILED_PRECONDITION, HTTP 4xx. Waits grow
exponentially with jitter (so a crowd of clients does not retry in lockstep), capped.

Users: the registry client (layerstore → registry, oci/_retry.py), discovery queries and mount → layerstore
calls (cluster/discovery_client.py, node/images.py, cluster/fetcher.py), and the proxy's dispatch to
afslets (proxy/).
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

import grpc

T = TypeVar("T")

RETRYABLE_GRPC = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                            grpc.StatusCode.ABORTED})
RETRYABLE_HTTP = frozenset({429, 500, 502, 503, 504})
# Answers any server would give again: asking another replica or provider is no use either.
PERMANENT_GRPC = frozenset({grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
                            grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED,
                            grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.OUT_OF_RANGE,
                            grpc.StatusCode.ALREADY_EXISTS})


def grpc_retryable(code: grpc.StatusCode | None) -> bool:
    """Worth calling the same server again after a wait."""
    return code in RETRYABLE_GRPC


def grpc_retry_soon(code: grpc.StatusCode | None) -> bool:
    """Retryable and failed fast (refused, restarting, aborted): worth another round over all servers.
    A DEADLINE_EXCEEDED already cost its caller a whole timeout; rounds do not repeat those."""
    return code in RETRYABLE_GRPC and code != grpc.StatusCode.DEADLINE_EXCEEDED


def grpc_permanent(code: grpc.StatusCode | None) -> bool:
    """About the request itself: another server would say the same (no failover, no retry)."""
    return code in PERMANENT_GRPC


def http_retryable(status: int) -> bool:
    return status in RETRYABLE_HTTP


def is_retryable(error: BaseException) -> bool:
    """Whether the same call could succeed if made again (gRPC errors; others are not judged here)."""
    if isinstance(error, grpc.aio.AioRpcError):
        return grpc_retryable(error.code())
    return False


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 4          # calls in all, the first included
    base: float = 0.2          # seconds before the first retry (before jitter)
    cap: float = 10.0          # longest wait between two calls

    def delay(self, attempt: int) -> float:
        """The wait after failed call number `attempt` (1, 2, ...): exponential, jittered into [½, 1]."""
        # the exponent is capped: past ~1000 attempts 2**n no longer converts to a float
        ceiling = min(self.cap, self.base * 2 ** min(attempt - 1, 60))
        return random.uniform(ceiling / 2, ceiling)

    async def rounds(self) -> AsyncIterator[int]:
        """Round numbers 1 .. `attempts`, with the policy's wait before each one after the first: for
        callers that try several servers per round (discovery replicas, providers) and back off only
        once every one of them failed."""
        for attempt in range(1, self.attempts + 1):
            if attempt > 1:
                await asyncio.sleep(self.delay(attempt - 1))
            yield attempt

    async def run(self, operation: Callable[[], Awaitable[T]], *,
                  retryable: Callable[[BaseException], bool] = is_retryable,
                  delay_for: Callable[[BaseException, int], float | None] | None = None) -> T:
        """Call `operation` until it succeeds, fails with something `retryable` rejects, or the attempts
        run out (then the last error is raised). `delay_for` may override the wait (e.g. Retry-After)."""
        attempt = 0
        while True:
            attempt += 1
            try:
                return await operation()
            except Exception as error:
                if attempt >= self.attempts or not retryable(error):
                    raise
                wait = delay_for(error, attempt) if delay_for is not None else None
                await asyncio.sleep(self.delay(attempt) if wait is None else wait)


DEFAULT_POLICY = RetryPolicy()
