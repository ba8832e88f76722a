"""Relaying an accepted Execute call between the client and its afslet, both ways at once.

One message at a time in each direction: an upload frame is read from the client only once the previous
one was handed to the afslet's connection, and a response is read from the afslet only once the previous
one went to the client. gRPC's flow control then carries a slow reader's backpressure through the proxy,
and no stream (uploaded files, output, the tar) is ever held whole in the proxy's memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

import grpc

from afsd.api import afslet_pb2 as pb
from afsd.proxy.dispatch import Placement
from afsd.proxy.errors import ProxyError

log = logging.getLogger(__name__)

# The afslet (or the connection to it) broke, rather than answering the call with a status of its own.
_BACKEND_FAILURES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED, grpc.StatusCode.UNKNOWN,
                               grpc.StatusCode.INTERNAL})


async def relay(placement: Placement, requests: AsyncIterator[pb.ExecuteRequest]) -> AsyncIterator[pb.ExecuteResponse]:
    """The afslet's responses after `accepted`, while the client's remaining frames go up to it.

    Ends with a ProxyError if the afslet fails the call; leaving early (the client went away, or the
    proxy is shutting down) cancels the afslet's call, which makes it stop the command and clean up.
    """
    call = placement.call
    upload = asyncio.ensure_future(_forward(requests, call))
    try:
        while True:
            try:
                message = await call.read()
            except grpc.aio.AioRpcError as error:
                raise _failure(placement.address, error) from None
            if message is grpc.aio.EOF:
                return
            yield message
    finally:
        if not call.done():
            call.cancel()
        upload.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await upload


async def _forward(requests: AsyncIterator[pb.ExecuteRequest], call: grpc.aio.StreamStreamCall) -> None:
    try:
        async for frame in requests:
            await call.write(frame)
        await call.done_writing()
    except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
        pass  # the afslet ended the call: its status reaches the client on the response side
    except Exception as error:  # noqa: BLE001 - the client's stream broke: the afslet must not wait for it
        log.info("client upload failed (%s); cancelling the afslet's call", error)
        call.cancel()


def _failure(address: str, error: grpc.aio.AioRpcError) -> ProxyError:
    code, details = error.code(), error.details() or ""
    if code in _BACKEND_FAILURES:
        return ProxyError(f"afslet {address} failed during the execution: {code.name}: {details}; "
                          "the command may not have finished, run it again", grpc.StatusCode.UNAVAILABLE,
                          outcome="backend_failed")
    return ProxyError(details, code, outcome="backend_error")
