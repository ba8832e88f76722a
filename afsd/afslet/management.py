"""`afsd.executions.v1.Executions` on afslet: List, Logs and Stop over this afslet's executions
(executions.py), served on the same gRPC port as `afsletpb.Afslet`. The clients are `afsd ps`,
`afsd logs ID` and `afsd stop ID` (afsd/cli/executions.py); a proxy can fan the same calls out to
every afslet, so entries carry this afslet's node id and endpoint, and an id it does not know is
NOT_FOUND (the answer a fan-out skips).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator

import grpc

from afsd.afslet.cgroups import CgroupUsage
from afsd.afslet.executions import Execution, State
from afsd.afslet.log_tail import TailLine
from afsd.afslet.resources import to_proto
from afsd.afslet.runtime import Runtime
from afsd.afslet.stopping import WIRE_REASON, StopReason, wire_stop
from afsd.api import executions_pb2 as epb
from afsd.api import executions_pb2_grpc as epb_grpc
from afsd.rpc import refuse

LOGS_BATCH_BYTES = 1024 * 1024  # per LogsResponse, well under the 4 MiB message limit (lines are ≤ 64 KiB)

WIRE_STATE = {State.PREPARING: epb.STATE_PREPARING, State.RUNNING: epb.STATE_RUNNING,
              State.STOPPING: epb.STATE_STOPPING, State.FINISHED: epb.STATE_FINISHED}


def _batches(lines: list[TailLine]) -> Iterator[list[epb.LogLine]]:
    batch: list[epb.LogLine] = []
    size = 0
    for line in lines:
        if batch and size + len(line.message) > LOGS_BATCH_BYTES:
            yield batch
            batch, size = [], 0
        batch.append(epb.LogLine(source=line.source, message=line.message, unix_ms=line.unix_ms))
        size += len(line.message) + len(line.source) + 16
    if batch:
        yield batch


class ExecutionsService(epb_grpc.ExecutionsServicer):
    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime

    def entry(self, execution: Execution, usage: CgroupUsage) -> epb.Execution:
        """One execution as execution management shows it."""
        config = self.runtime.config
        message = epb.Execution(
            id=execution.id, node_id=config.node_id, endpoint=config.endpoint, image=execution.image,
            command=list(execution.command), cpu_cores=execution.cpu_cores, memory_mb=execution.memory_mb,
            gpus=execution.gpus, timeout_ms=execution.timeout_ms,
            created_unix_ms=int(execution.created_unix * 1000), age_ms=int(execution.age_seconds * 1000),
            state=WIRE_STATE[execution.state], usage=to_proto(usage, execution.wall_seconds),
            stop_reason=WIRE_REASON[execution.stop_requested])
        outcome = execution.outcome
        if outcome is not None:
            message.success, message.exit_code, message.error = outcome.success, outcome.exit_code, outcome.error
            message.outcome = outcome.kind
            message.stop_stage, message.stop_reason = wire_stop(outcome.stop)
            message.finished_unix_ms = int((execution.finished_unix or 0) * 1000)
        return message

    async def _entry_now(self, execution: Execution) -> epb.Execution:
        return self.entry(execution, await asyncio.to_thread(execution.usage_now))

    async def _find(self, execution_id: str, context: grpc.aio.ServicerContext) -> Execution:
        execution = self.runtime.executions.get(execution_id)
        if execution is None:
            where = self.runtime.config.node_id or self.runtime.config.endpoint
            await refuse(context, grpc.StatusCode.NOT_FOUND,
                         f"no execution {execution_id!r} on afslet {where} (`afsd ps -a` lists them)")
        return execution

    async def List(self, request: epb.ListRequest, context: grpc.aio.ServicerContext) -> epb.ListResponse:
        table = self.runtime.executions
        executions = sorted(table.live() + (table.finished() if request.include_finished else []),
                            key=lambda execution: execution.created_unix)
        usages = await asyncio.to_thread(lambda: [execution.usage_now() for execution in executions])
        return epb.ListResponse(executions=[self.entry(e, u) for e, u in zip(executions, usages)])

    async def Logs(self, request: epb.LogsRequest,
                   context: grpc.aio.ServicerContext) -> AsyncIterator[epb.LogsResponse]:
        if request.tail < 0:
            await refuse(context, grpc.StatusCode.INVALID_ARGUMENT, f"tail must be >= 0 (got {request.tail})")
        tail = (await self._find(request.id, context)).logs
        seq = tail.next_seq
        for batch in _batches(tail.last(request.tail)):
            yield epb.LogsResponse(lines=batch)
        if not request.follow:
            return
        while True:
            await tail.wait_beyond(seq)
            lines, dropped = tail.after(seq)
            seq = tail.next_seq
            if dropped:
                yield epb.LogsResponse(dropped=dropped)
            for batch in _batches(lines):
                yield epb.LogsResponse(lines=batch)
            if tail.closed and seq >= tail.next_seq:
                return

    async def Stop(self, request: epb.StopRequest, context: grpc.aio.ServicerContext) -> epb.StopResponse:
        execution = await self._find(request.id, context)
        if execution.state is State.FINISHED:
            return epb.StopResponse(execution=await self._entry_now(execution), already_finished=True)
        execution.request_stop(StopReason.REQUEST)
        await execution.wait_finished()
        return epb.StopResponse(execution=await self._entry_now(execution))
