"""How long a dispatch keeps trying: the retry bound and the backoff between attempts.

A request may set `proxy_dispatch_max_retries` and `proxy_dispatch_backoff_ms`; 0 (what afs-sdk sends by
default) means the server's default — never "retry forever" as in the reference. The wait before retry
n (1-based) is the shared policy's (`afsd.retry`): exponential with "equal jitter", d = min(cap,
base * 2^(n-1)), then a uniform draw in [d/2, d], so callers waiting on the same full cluster spread out
instead of retrying in lockstep. Only the bound and the base come from the request here.

Backoff alone would leave a waiting call asleep for up to the cap after room appeared. When a call this
proxy relayed ends (its afslet has released its share by then), the longest-waiting dispatch is woken
to try at once: first come, first served among the waiters of one proxy, without a thundering herd.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from dataclasses import dataclass

from afsd import retry as shared_retry
from afsd.api import afslet_pb2 as pb


@dataclass(frozen=True)
class RetryDefaults:
    """The server's side (`--dispatch-max-retries`, `--dispatch-backoff-ms`, `--dispatch-max-backoff-ms`)."""

    max_retries: int = 20
    backoff_ms: int = 50
    max_backoff_ms: int = 2000


@dataclass(frozen=True)
class RetryPolicy:
    max_retries: int
    backoff_ms: int
    max_backoff_ms: int

    @classmethod
    def for_request(cls, start: pb.StartRequest, defaults: RetryDefaults) -> RetryPolicy:
        """The request's own values where set (> 0), the server's otherwise. Negative values are the
        caller's to refuse (INVALID_ARGUMENT) before this is asked."""
        return cls(max_retries=start.proxy_dispatch_max_retries or defaults.max_retries,
                   backoff_ms=start.proxy_dispatch_backoff_ms or defaults.backoff_ms,
                   max_backoff_ms=max(defaults.max_backoff_ms, start.proxy_dispatch_backoff_ms))

    def delay(self, retry: int) -> float:
        """Seconds to wait before retry number `retry` (1 for the first retry)."""
        shared = shared_retry.RetryPolicy(attempts=self.max_retries + 1, base=self.backoff_ms / 1000.0,
                                          cap=self.max_backoff_ms / 1000.0)
        return shared.delay(min(retry, 32))  # past 2^31 × base every wait is the cap; a bigger power overflows

    def worst_case_wait(self) -> float:
        """Seconds of backoff before giving up if every attempt fails (the documented bound)."""
        return sum(min(self.max_backoff_ms, self.backoff_ms * 2 ** min(n, 30))
                   for n in range(self.max_retries)) / 1000.0


class Waiters:
    """Dispatches sleeping between attempts, oldest first."""

    def __init__(self) -> None:
        self._sleeping: collections.deque[asyncio.Future[None]] = collections.deque()

    async def sleep(self, seconds: float) -> None:
        """Sleep `seconds`, or less if woken by `wake_oldest`."""
        woken: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._sleeping.append(woken)
        try:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(woken, seconds)
        finally:
            self._sleeping.remove(woken)

    def wake_oldest(self) -> None:
        for waiter in self._sleeping:
            if not waiter.done():
                waiter.set_result(None)
                return
