"""`afsletpb.Afslet` served by the proxy: Execute placed on an afslet and relayed, and GetRuntimeStatus
summed over the afslets (the reference proxy answered UNIMPLEMENTED there)."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator

import grpc

from afsd.afslet.request import resource_problem
from afsd.api import afslet_pb2 as pb
from afsd.api import afslet_pb2_grpc as pb_grpc
from afsd.proxy.backends import BackendChannels, probe_all, problems, total
from afsd.proxy.dispatch import Dispatcher
from afsd.proxy.errors import ProxyError, TargetResolveError
from afsd.proxy.metrics import CHOSEN, DISPATCH_SECONDS, DISPATCHES, QUEUE_LENGTH, RELAYING
from afsd.proxy.peers import DispatchCounts
from afsd.proxy.relay import relay
from afsd.proxy.targets import resolve_target
from afsd.rpc import refuse

log = logging.getLogger(__name__)


def _invalid(message: str) -> ProxyError:
    return ProxyError(message, grpc.StatusCode.INVALID_ARGUMENT, outcome="invalid")


async def read_start(requests: AsyncIterator[pb.ExecuteRequest]) -> pb.ExecuteRequest:
    """The first frame, which must be a start the proxy can place (the afslet checks the rest)."""
    try:
        frame = await anext(aiter(requests))
    except StopAsyncIteration:
        raise _invalid("missing start request: the stream ended before its first frame") from None
    kind = frame.WhichOneof("payload")
    if kind != "start":
        raise _invalid(f"first request must be start, got {kind or 'an empty frame'}")
    start = frame.start
    if not start.image.strip():
        raise _invalid("start.image is required")
    if problem := resource_problem(start):
        raise _invalid(problem)
    if start.proxy_dispatch_max_retries < 0:
        raise _invalid(f"start.proxy_dispatch_max_retries must be >= 0 (got {start.proxy_dispatch_max_retries}; "
                       "0 means the proxy's default)")
    if start.proxy_dispatch_backoff_ms < 0:
        raise _invalid(f"start.proxy_dispatch_backoff_ms must be >= 0 (got {start.proxy_dispatch_backoff_ms}; "
                       "0 means the proxy's default)")
    return frame


class ProxyAfsletService(pb_grpc.AfsletServicer):
    def __init__(self, dispatcher: Dispatcher, channels: BackendChannels, counts: DispatchCounts, node_id: str) -> None:
        self.dispatcher = dispatcher
        self.channels = channels
        self.counts = counts
        self.node_id = node_id

    async def Execute(self, request_iterator: AsyncIterator[pb.ExecuteRequest],
                      context: grpc.aio.ServicerContext) -> AsyncIterator[pb.ExecuteResponse]:
        outcome = "cancelled"  # unless the call gets further
        placement = None
        self.counts.waiting += 1
        QUEUE_LENGTH.inc()
        try:
            start_frame = await read_start(request_iterator)
            remaining = context.time_remaining()
            deadline = None if remaining is None else time.monotonic() + remaining
            placement = await self.dispatcher.dispatch(start_frame, deadline)
            self.counts.waiting -= 1
            self.counts.relaying += 1
            QUEUE_LENGTH.dec()
            RELAYING.inc()
            DISPATCH_SECONDS.observe(placement.seconds)
            CHOSEN.labels(placement.address).inc()
            log.info("Execute of %s placed on %s (attempt %d, %.0f ms, %s)", start_frame.start.image,
                     placement.address, placement.attempts, placement.seconds * 1000, placement.reason)
            yield placement.accepted
            yield pb.ExecuteResponse(log=pb.LogMessage(
                source="proxy", message=f"dispatched to afslet {placement.address} by proxy {self.node_id} "
                                        f"(attempt {placement.attempts}, {placement.seconds * 1000:.0f} ms, "
                                        f"{placement.reason})"))
            async with contextlib.aclosing(relay(placement, request_iterator)) as responses:
                async for message in responses:
                    if message.WhichOneof("payload") == "done":
                        outcome = "ok"  # the client may hang up as soon as it has this last frame
                    yield message
            outcome = "ok"
        except ProxyError as error:
            outcome = error.outcome
            if error.code != grpc.StatusCode.INVALID_ARGUMENT:
                log.warning("Execute failed: %s", error)
            await refuse(context, error.code, str(error))
        finally:
            DISPATCHES.labels(outcome).inc()  # before the counts drop, so an idle proxy has counted every call
            if placement is None:
                self.counts.waiting -= 1
                QUEUE_LENGTH.dec()
            else:
                if not placement.call.done():
                    placement.call.cancel()  # the client left: the afslet stops the command and frees the share
                self.counts.relaying -= 1
                RELAYING.dec()
                self.dispatcher.room_freed()

    async def GetRuntimeStatus(self, request: pb.GetRuntimeStatusRequest,
                               context: grpc.aio.ServicerContext) -> pb.GetRuntimeStatusResponse:
        """The sum over every afslet that answers (running containers, limits, use, room)."""
        try:
            addresses = await resolve_target(self.dispatcher.config.afslet_target)
        except TargetResolveError as error:
            await refuse(context, grpc.StatusCode.UNAVAILABLE, f"no afslets: {error}")
        statuses = await probe_all(self.channels, addresses, self.dispatcher.config.status_timeout)
        if not any(s.reachable for s in statuses):
            await refuse(context, grpc.StatusCode.UNAVAILABLE, f"no afslet answered ({problems(statuses)})")
        return total(statuses)
