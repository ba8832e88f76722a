"""`afsletpb.Afslet` over gRPC: Execute (bidirectional stream) and GetRuntimeStatus.

Each Execute call runs as its own task (`session.ExecuteCall`) that puts response frames into a small
bounded queue; the handler yields them to gRPC. The queue's bound is the backpressure: a client that
reads slowly slows the container's output pumps (and so the container's writes) and the tar reader,
instead of frames piling up in afslet's memory. When the client goes away, gRPC cancels the handler,
which cancels the call's task; the task's teardown is shielded and finishes regardless.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc

from afsd.afslet.errors import AdmissionError, DeadlineError, LimitError, RequestError, ShuttingDownError
from afsd.afslet.runtime import Runtime
from afsd.afslet.session import ExecuteCall
from afsd.api import afslet_pb2 as pb
from afsd.api import afslet_pb2_grpc as pb_grpc
from afsd.errors import AfsdError
from afsd.rpc import refuse, status_for

log = logging.getLogger(__name__)

OUTBOX_DEPTH = 64


@dataclass(frozen=True)
class _End:
    error: BaseException | None = None


def _status(error: BaseException) -> tuple[grpc.StatusCode, str]:
    if isinstance(error, RequestError):
        return grpc.StatusCode.INVALID_ARGUMENT, str(error)
    if isinstance(error, (AdmissionError, LimitError)):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, str(error)
    if isinstance(error, DeadlineError):
        return grpc.StatusCode.DEADLINE_EXCEEDED, str(error)
    if isinstance(error, ShuttingDownError):
        return grpc.StatusCode.UNAVAILABLE, str(error)
    if isinstance(error, AfsdError):
        return status_for(error), str(error)
    return grpc.StatusCode.INTERNAL, f"internal error in afslet: {type(error).__name__}: {error}"


class AfsletService(pb_grpc.AfsletServicer):
    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime

    async def Execute(self, request_iterator: AsyncIterator[pb.ExecuteRequest],
                      context: grpc.aio.ServicerContext) -> AsyncIterator[pb.ExecuteResponse]:
        outbox: asyncio.Queue[pb.ExecuteResponse | _End] = asyncio.Queue(maxsize=OUTBOX_DEPTH)
        call = ExecuteCall(self.runtime, request_iterator, outbox.put)

        async def run() -> None:
            try:
                await call.run()
            except asyncio.CancelledError:
                raise
            except Exception as error:  # noqa: BLE001 - every failure becomes the call's status
                await outbox.put(_End(error))
            else:
                await outbox.put(_End())

        task = asyncio.ensure_future(run())
        self.runtime.track(task)
        # The handler itself counts as in flight until its last frame is handed to gRPC: a drain that
        # only waited for the call's task would stop the server while `done` is still in the outbox.
        handler_done = asyncio.get_running_loop().create_future()
        self.runtime.track(handler_done)
        try:
            while True:
                item = await outbox.get()
                if isinstance(item, _End):
                    if item.error is not None:
                        code, message = _status(item.error)
                        if code == grpc.StatusCode.INTERNAL:
                            log.error("Execute failed", exc_info=item.error)
                        await refuse(context, code, message)
                    return
                yield item
        finally:
            if not task.done():
                task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
            handler_done.set_result(None)

    async def GetRuntimeStatus(self, request: pb.GetRuntimeStatusRequest,
                               context: grpc.aio.ServicerContext) -> pb.GetRuntimeStatusResponse:
        usage = self.runtime.admission.usage()
        return pb.GetRuntimeStatusResponse(
            running_containers=self.runtime.running_containers,
            limit_cpu_cores=usage.limit_cpu_cores, limit_memory_mb=usage.limit_memory_mb,
            used_cpu_cores=usage.used_cpu_cores, used_memory_mb=usage.used_memory_mb,
            available_cpu_cores=usage.available_cpu_cores, available_memory_mb=usage.available_memory_mb,
            limit_gpus=usage.limit_gpus, used_gpus=usage.used_gpus, available_gpus=usage.available_gpus,
            draining=self.runtime.draining)
