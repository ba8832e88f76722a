"""`afsd.executions.v1.Executions` served by the proxy for every afslet behind it, so that `afsd ps`,
`afsd logs ID` and `afsd stop ID` work with `--target PROXY` as they do against one afslet.

    List ──► every address `--afslet-target` resolves to now, in parallel (each bounded by
             `--status-timeout`) ──► the entries merged, oldest first; afslets that did not answer are
             named in `unreachable` (the call itself succeeds)
    Logs, Stop ──► the afslet that has the execution: the one named by the request's `endpoint` if it is
             one of those addresses, else found by asking each for the id (a one-line Logs, in parallel;
             execution ids are unique across afslets, and an afslet that does not know one answers
             NOT_FOUND) ──► the call is made there and its answer (or stream) relayed as it is

The afslets' entries already name their node and endpoint, so nothing is rewritten on the way.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc

from afsd.api import executions_pb2 as epb
from afsd.api import executions_pb2_grpc as epb_grpc
from afsd.proxy.backends import BackendChannels
from afsd.proxy.config import ProxyConfig
from afsd.proxy.errors import ProxyError, TargetResolveError, unreachable
from afsd.proxy.targets import resolve_target
from afsd.rpc import failure_cause, refuse

# The afslet (or the connection to it) broke, rather than answering with a status of its own.
_BACKEND_FAILURES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED, grpc.StatusCode.UNKNOWN,
                               grpc.StatusCode.INTERNAL, grpc.StatusCode.DEADLINE_EXCEEDED})


def _relayed(address: str, error: grpc.aio.AioRpcError) -> ProxyError:
    """The status a client gets when the afslet's call failed: the afslet's own answer as it is, or
    UNAVAILABLE naming the afslet when it could not be reached or broke."""
    if error.code() in _BACKEND_FAILURES:
        cause = failure_cause(error.code(), error.details())
        return ProxyError(unreachable(address, cause), grpc.StatusCode.UNAVAILABLE)
    return ProxyError(error.details() or error.code().name, error.code())


class ProxyExecutionsService(epb_grpc.ExecutionsServicer):
    def __init__(self, config: ProxyConfig, channels: BackendChannels) -> None:
        self.config = config
        self.channels = channels

    def _timeout(self, context: grpc.aio.ServicerContext) -> float:
        """A question to one afslet: the status timeout, or less if the client's deadline is nearer."""
        remaining = context.time_remaining()
        return self.config.status_timeout if remaining is None else min(self.config.status_timeout, remaining)

    async def _afslets(self) -> list[str]:
        try:
            return await resolve_target(self.config.afslet_target)
        except TargetResolveError as error:
            raise ProxyError(f"no afslets: {error}", grpc.StatusCode.UNAVAILABLE) from None

    async def List(self, request: epb.ListRequest, context: grpc.aio.ServicerContext) -> epb.ListResponse:
        try:
            addresses = await self._afslets()
        except ProxyError as error:
            await refuse(context, error.code, str(error))
        timeout = self._timeout(context)

        async def ask(address: str) -> epb.ListResponse | str:
            try:
                return await self.channels.executions(address).List(request, timeout=timeout)
            except grpc.aio.AioRpcError as error:
                return failure_cause(error.code(), error.details())

        merged = epb.ListResponse()
        executions = []
        for address, answer in zip(addresses, await asyncio.gather(*(ask(a) for a in addresses))):
            if isinstance(answer, str):
                merged.unreachable.add(endpoint=address, error=answer)
            else:
                executions += answer.executions
        merged.executions.extend(sorted(executions, key=lambda e: (e.created_unix_ms, e.id)))
        return merged

    async def _owner(self, execution_id: str, endpoint: str, context: grpc.aio.ServicerContext) -> str:
        """The address of the afslet that has `execution_id` (ProxyError when none that answered has it)."""
        if not execution_id:
            raise ProxyError("id is required (`afsd ps` lists the executions)", grpc.StatusCode.INVALID_ARGUMENT)
        addresses = await self._afslets()
        if endpoint in addresses:
            return endpoint  # the hint `List` gave; any other address is not the proxy's to call
        timeout = self._timeout(context)

        async def knows(address: str) -> bool | str:
            try:
                async for _ in self.channels.executions(address).Logs(epb.LogsRequest(id=execution_id, tail=1),
                                                                     timeout=timeout):
                    pass
            except grpc.aio.AioRpcError as error:
                if error.code() == grpc.StatusCode.NOT_FOUND:
                    return False
                return failure_cause(error.code(), error.details())
            return True

        answers = await asyncio.gather(*(knows(address) for address in addresses))
        owners = [address for address, answer in zip(addresses, answers) if answer is True]
        if owners:
            return owners[0]
        silent = [unreachable(address, cause) for address, cause in zip(addresses, answers) if isinstance(cause, str)]
        if silent:
            raise ProxyError(f"no afslet of {self.config.afslet_target} that answered has execution {execution_id!r}, "
                             f"and {len(silent)} did not answer ({'; '.join(silent)}); try again",
                             grpc.StatusCode.UNAVAILABLE)
        raise ProxyError(f"no execution {execution_id!r} on any afslet of {self.config.afslet_target} "
                         f"({len(addresses)} asked; `afsd ps -a` lists them)", grpc.StatusCode.NOT_FOUND)

    async def Logs(self, request: epb.LogsRequest,
                   context: grpc.aio.ServicerContext) -> AsyncIterator[epb.LogsResponse]:
        try:
            if request.tail < 0:
                raise ProxyError(f"tail must be >= 0 (got {request.tail})", grpc.StatusCode.INVALID_ARGUMENT)
            address = await self._owner(request.id, request.endpoint, context)
            call = self.channels.executions(address).Logs(request, timeout=context.time_remaining())
            try:
                async for response in call:
                    yield response
            except grpc.aio.AioRpcError as error:
                raise _relayed(address, error) from None
            finally:
                call.cancel()  # the client left (or a follow is cut short by shutdown): stop reading there too
        except ProxyError as error:
            await refuse(context, error.code, str(error))

    async def Stop(self, request: epb.StopRequest, context: grpc.aio.ServicerContext) -> epb.StopResponse:
        try:
            address = await self._owner(request.id, request.endpoint, context)
            try:  # as long as the client waits: the staged abort takes up to the sum of the afslet's stages
                return await self.channels.executions(address).Stop(request, timeout=context.time_remaining())
            except grpc.aio.AioRpcError as error:
                raise _relayed(address, error) from None
        except ProxyError as error:
            await refuse(context, error.code, str(error))
