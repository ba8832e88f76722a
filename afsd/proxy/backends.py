"""The afslets behind the proxy: a channel per address (for Execute, GetRuntimeStatus and execution
management), and their runtime status (limits, use, room).

Statuses are asked for fresh at every dispatch attempt (GetRuntimeStatus, all addresses in parallel,
each bounded by the status timeout): they are the afslets' own admission ledgers, so the proxy never
keeps a view of its own that could drift.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import grpc

from afsd.api import afslet_pb2 as pb
from afsd.api import afslet_pb2_grpc as pb_grpc
from afsd.api import executions_pb2_grpc as epb_grpc
from afsd.proxy.errors import unreachable
from afsd.rpc import CHANNEL_OPTIONS, ChannelPool, failure_cause

# An afslet restarted on the same address must be reachable again within about a second, not after
# gRPC's default reconnect backoff (up to two minutes).
BACKEND_CHANNEL_OPTIONS = [
    *CHANNEL_OPTIONS,
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
]


class BackendChannels(ChannelPool):
    """A channel per afslet address, shared by every call to it (gRPC multiplexes them)."""

    channel_options = BACKEND_CHANNEL_OPTIONS

    def stub(self, address: str) -> pb_grpc.AfsletStub:
        return pb_grpc.AfsletStub(self.get(address))

    def executions(self, address: str) -> epb_grpc.ExecutionsStub:
        """The afslet's execution management (`afsd.executions.v1.Executions`, on the same port)."""
        return epb_grpc.ExecutionsStub(self.get(address))


@dataclass(frozen=True)
class BackendStatus:
    """One afslet as seen by one probe: its runtime status, or why it did not answer (`error`)."""

    address: str
    status: pb.GetRuntimeStatusResponse | None
    error: str = ""

    @property
    def reachable(self) -> bool:
        return self.status is not None


async def probe(channels: BackendChannels, address: str, timeout: float) -> BackendStatus:
    try:
        status = await channels.stub(address).GetRuntimeStatus(pb.GetRuntimeStatusRequest(), timeout=timeout)
    except grpc.aio.AioRpcError as error:
        return BackendStatus(address, None, failure_cause(error.code(), error.details()))
    return BackendStatus(address, status)


async def probe_all(channels: BackendChannels, addresses: list[str], timeout: float) -> list[BackendStatus]:
    """The status of every address, in the order given."""
    return list(await asyncio.gather(*(probe(channels, address, timeout) for address in addresses)))


def problems(statuses: list[BackendStatus]) -> str:
    """Why none of `statuses` takes calls, one afslet after the other on one line."""
    return "; ".join(unreachable(s.address, s.error) if s.status is None else f"afslet {s.address} is draining"
                     for s in statuses)


def total(statuses: list[BackendStatus]) -> pb.GetRuntimeStatusResponse:
    """The sum over the afslets that answered: what the proxy's own GetRuntimeStatus reports (a draining
    afslet's running calls and limits count; `draining` stays false: the proxy itself takes calls)."""
    result = pb.GetRuntimeStatusResponse()
    for backend in statuses:
        if backend.status is None:
            continue
        for field in ("running_containers", "limit_cpu_cores", "limit_memory_mb", "used_cpu_cores",
                      "used_memory_mb", "available_cpu_cores", "available_memory_mb", "limit_gpus", "used_gpus",
                      "available_gpus"):
            setattr(result, field, getattr(result, field) + getattr(backend.status, field))
    return result
