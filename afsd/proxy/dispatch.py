"""Placing one Execute call on an afslet: attempts, each from a fresh DNS answer and fresh statuses,
until one afslet has sent `accepted`.

Before `accepted` an afslet has done nothing but check the start frame and reserve a share, so trying
another afslet (or the same one later) is always safe. After it, the call belongs to that afslet and is
never moved (see relay.py).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from dataclasses import dataclass

import grpc

from afsd.api import afslet_pb2 as pb
from afsd.proxy.backends import BackendChannels, probe_all, problems
from afsd.proxy.config import ProxyConfig
from afsd.proxy.errors import ProxyError, RetryableDispatchError, TargetResolveError, unreachable
from afsd.proxy.metrics import RETRIES
from afsd.proxy.placement import Demand, PendingShares, Strategy, candidates, feasible, place, too_big_for_all
from afsd.proxy.retry import RetryPolicy, Waiters
from afsd.proxy.targets import resolve_preferred, resolve_target
from afsd.retry import PERMANENT_GRPC
from afsd.rpc import failure_cause

log = logging.getLogger(__name__)

# What an afslet says about the request itself: another afslet would say the same, so it goes to the client.
_ANSWERS_FOR_THE_CLIENT = PERMANENT_GRPC | {grpc.StatusCode.UNIMPLEMENTED}


@dataclass
class Placement:
    """An Execute call an afslet has accepted: relay `accepted`, then the rest of `call`."""

    address: str
    call: grpc.aio.StreamStreamCall
    accepted: pb.ExecuteResponse
    attempts: int
    seconds: float
    reason: str      # why this afslet, in the strategy's words (p2c, best-fit, local-first: preferred ...)


class Dispatcher:
    def __init__(self, config: ProxyConfig, channels: BackendChannels, rng: random.Random | None = None) -> None:
        self.config = config
        self.channels = channels
        self.pending = PendingShares()
        self.waiters = Waiters()
        self._rng = rng or random.Random()

    async def dispatch(self, start_frame: pb.ExecuteRequest, deadline: float | None = None) -> Placement:
        """Try until an afslet accepts `start_frame`, or the retries allowed are used up (ProxyError with
        UNAVAILABLE), or the request can never fit (ProxyError with INVALID_ARGUMENT), or an afslet refuses
        the request itself (its own status). `deadline` (time.monotonic) bounds the afslet call too."""
        start = start_frame.start
        demand = Demand.of(start)
        policy = RetryPolicy.for_request(start, self.config.retry)
        began = time.monotonic()
        failures = 0
        while True:
            try:
                call, accepted, address, reason = await self._attempt(start_frame, demand, deadline)
            except RetryableDispatchError as error:
                failures += 1
                if failures > policy.max_retries:
                    raise ProxyError(
                        f"no afslet accepted the request ({demand}) after {failures} attempts in "
                        f"{time.monotonic() - began:.1f}s; last: {error}", outcome="exhausted") from None
                RETRIES.labels(error.reason).inc()
                delay = policy.delay(failures)
                log.info("dispatch attempt %d failed (%s), next in %.0f ms", failures, error, delay * 1000)
                await self.waiters.sleep(delay)
                continue
            return Placement(address, call, accepted, failures + 1, time.monotonic() - began, reason)

    def room_freed(self) -> None:
        """A call this proxy relayed has ended: its afslet has room again, so the oldest waiter tries now."""
        self.waiters.wake_oldest()

    async def _attempt(self, start_frame: pb.ExecuteRequest, demand: Demand,
                       deadline: float | None) -> tuple[grpc.aio.StreamStreamCall, pb.ExecuteResponse, str, str]:
        target = self.config.afslet_target
        try:
            addresses = await resolve_target(target)
        except TargetResolveError as error:
            raise RetryableDispatchError(f"no afslets: {error}", "no_backends") from None
        statuses, preferred = await asyncio.gather(
            probe_all(self.channels, addresses, self.config.status_timeout), self._preferred())
        accepting = candidates(statuses, self.pending)
        if not accepting:
            raise RetryableDispatchError(f"no afslet of {target} takes calls ({problems(statuses)})", "unreachable")
        gpus = demand.gpus > 0
        if too_big_for_all(demand, accepting):
            limits = ", ".join(f"{c.address} {c.limits.describe(gpus)}" for c in accepting)
            raise ProxyError(f"request {demand} is bigger than every afslet's limits ({limits}); ask for less",
                             grpc.StatusCode.INVALID_ARGUMENT, outcome="too_big")
        options = feasible(demand, accepting)
        if not options:
            room = ", ".join(f"{c.address} {c.available.describe(gpus)}" for c in accepting)
            raise RetryableDispatchError(f"no afslet has room for {demand} now (available: {room})", "no_room")
        choice = place(self.config.strategy, demand, options, self._rng, preferred)
        address = choice.candidate.address
        with self.pending.hold(address, demand):
            call, accepted = await self._handshake(address, start_frame, deadline)
        return call, accepted, address, choice.reason

    async def _preferred(self) -> frozenset[str]:
        """local-first's preferred afslet addresses, looked up again at every attempt like the afslets."""
        if self.config.strategy is not Strategy.LOCAL_FIRST:
            return frozenset()
        return await resolve_preferred(self.config.prefer, self.config.afslet_target)

    async def _handshake(self, address: str, start_frame: pb.ExecuteRequest,
                         deadline: float | None) -> tuple[grpc.aio.StreamStreamCall, pb.ExecuteResponse]:
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        call = self.channels.stub(address).Execute(timeout=timeout)
        try:
            first = await asyncio.wait_for(self._open(call, start_frame), self.config.handshake_timeout)
        except TimeoutError:
            call.cancel()
            raise RetryableDispatchError(
                f"afslet {address} did not accept within {self.config.handshake_timeout:g}s", "handshake") from None
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
            code, details = await call.code(), await call.details()
            if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
                raise RetryableDispatchError(f"afslet {address} has no room: {details}", "refused") from None
            if code in _ANSWERS_FOR_THE_CLIENT:
                raise ProxyError(details, code, outcome="refused") from None
            raise RetryableDispatchError(unreachable(address, failure_cause(code, details)), "unreachable") from None
        except BaseException:
            call.cancel()
            raise
        if first is grpc.aio.EOF or first.WhichOneof("payload") != "accepted" or not first.accepted.accepted:
            call.cancel()
            raise RetryableDispatchError(f"afslet {address} did not answer with `accepted` first", "handshake")
        return call, first

    @staticmethod
    async def _open(call: grpc.aio.StreamStreamCall, start_frame: pb.ExecuteRequest) -> object:
        await call.write(start_frame)
        return await call.read()
