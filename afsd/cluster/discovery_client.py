"""Talking to discovery from the other daemons: queries, image resolution and heartbeats.

Endpoints are `host:port` strings. Queries go to the first replica that answers, in the configured
order, so that all nodes configured alike ask the same replica (one registry resolution per image)
and fail over to the next. Heartbeats (and access trace reports) go to every replica, and to every
address a replica's host name resolves to, looked up again at each beat: replicas behind one DNS name
all learn about us.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

import grpc

from afsd.api import discovery_pb2 as pb
from afsd.api import discovery_pb2_grpc as pb_grpc
from afsd.cluster.peer_answers import (MAX_LISTED_NODES, PeerAnswerError, check_access_traces, check_resolved,
                                      check_services)
from afsd.retry import RetryPolicy, grpc_permanent, grpc_retry_soon
from afsd.rpc import ChannelPool

log = logging.getLogger(__name__)

T = TypeVar("T")

QUERY_TIMEOUT = 5.0
HEARTBEAT_TIMEOUT = 5.0
DNS_TIMEOUT = 3.0


class DiscoveryUnavailableError(Exception):
    """No discovery replica answered."""


def split_host_port(endpoint: str) -> tuple[str, int]:
    host, sep, port = endpoint.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ValueError(f"invalid endpoint {endpoint!r}: expected HOST:PORT")
    return host.strip("[]"), int(port)


def resolved_name(endpoint: str) -> str | None:
    """The DNS name `endpoint`'s addresses are resolved from (what a replica's certificate must name when
    it is dialled at one of them), or None when its host is a literal IP (dialled as it is)."""
    host = split_host_port(endpoint)[0]
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return host
    return None


def join_host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def expand_endpoint(endpoint: str) -> list[str]:
    """Every address `endpoint`'s host resolves to (A and AAAA), sorted; a literal IP as is."""
    host, port = split_host_port(endpoint)
    loop = asyncio.get_running_loop()
    try:
        infos = await asyncio.wait_for(
            loop.getaddrinfo(host, port, type=socket.SOCK_STREAM), DNS_TIMEOUT)
    except (TimeoutError, OSError) as error:
        log.warning("cannot resolve discovery endpoint %s: %s", endpoint, error)
        return []
    return sorted({join_host_port(info[4][0], port) for info in infos})


# Queries go to each replica in turn; when every replica failed retryably, wait and go round again.
QUERY_RETRY = RetryPolicy(attempts=3, base=0.2, cap=2.0)


async def all_pages(page: Callable[[str], Awaitable[pb.FindProviderResponse]], *,
                    peer: str) -> list[pb.ServiceInstance]:
    """The services of every page of a listing, `page(token)` giving each (the first with ""). A
    discovery that never stops paging (more than MAX_LISTED_NODES services) is refused."""
    found: list[pb.ServiceInstance] = []
    token = ""
    while True:
        answer = await page(token)
        found += answer.services
        if len(found) > MAX_LISTED_NODES:
            raise PeerAnswerError(peer, f"listed more than {MAX_LISTED_NODES} nodes over its pages")
        token = answer.next_page_token
        if not token or not answer.services:
            return found


class DiscoveryClient:
    def __init__(self, endpoints: Sequence[str], channels: ChannelPool | None = None,
                 retry: RetryPolicy = QUERY_RETRY) -> None:
        self.endpoints = list(endpoints)
        self._channels = channels or ChannelPool()
        self._retry = retry

    def _stub(self, address: str, server_name: str | None = None) -> pb_grpc.ServiceDiscoveryStub:
        return pb_grpc.ServiceDiscoveryStub(self._channels.get(address, server_name=server_name))

    async def _first(self, call: Callable[[pb_grpc.ServiceDiscoveryStub], Awaitable[T]],
                     check: Callable[[T, str], object] = lambda answer, endpoint: None) -> T:
        """The answer of the first replica that gives one `check(answer, endpoint)` accepts; a replica
        whose answer fails the check counts as failed (logged with its name), and the next is asked."""
        errors: dict[str, str] = {}
        async for _ in self._retry.rounds():
            worth_another_round = False
            for endpoint in self.endpoints:
                try:
                    answer = await call(self._stub(endpoint))
                    check(answer, f"discovery {endpoint}")
                    return answer
                except PeerAnswerError as error:
                    log.warning("ignoring the answer of %s", error)
                    errors[endpoint] = error.problem
                except grpc.aio.AioRpcError as error:
                    if grpc_permanent(error.code()):
                        raise  # the same answer from every replica
                    errors[endpoint] = f"{error.code().name} {error.details()}"
                    worth_another_round |= grpc_retry_soon(error.code())
            if not worth_another_round:
                break
        raise DiscoveryUnavailableError("no discovery replica answered: " + "; ".join(
            [f"{endpoint}: {reason}" for endpoint, reason in errors.items()] or ["none configured"]))

    async def find_provider(self, digest: str, *, include_pulling: bool = False, max_services: int = 0,
                            requester: str = "") -> list[pb.ServiceInstance]:
        """Nodes holding (or, with `include_pulling`, fetching) the layer `digest`, each record cut down
        to that layer: the first page of the answer (thousands of nodes), `max_services` at most."""
        if not digest:
            raise ValueError("find_provider needs a layer digest; list_nodes() lists every node")
        response = await self._first(lambda stub: stub.FindProvider(
            pb.FindProviderRequest(layer_digest=digest, include_pulling=include_pulling, max_services=max_services,
                                   requester_endpoint=requester), timeout=QUERY_TIMEOUT),
            lambda answer, peer: check_services(answer.services, peer=peer))
        return list(response.services)

    async def list_nodes(self, view: int = pb.SERVICE_VIEW_ENDPOINTS) -> list[pb.ServiceInstance]:
        """Every live node (all pages of `FindProvider("")`); by default only what picks a node (ids,
        endpoints), so the answer stays small however large the cluster."""
        async def page(token: str) -> pb.FindProviderResponse:
            return await self._first(lambda stub: stub.FindProvider(
                pb.FindProviderRequest(view=view, page_token=token), timeout=QUERY_TIMEOUT),
                lambda answer, peer: check_services(answer.services, peer=peer))
        return await all_pages(page, peer="discovery")

    async def resolve_image(self, request: pb.ResolveImageRequest, timeout: float = 60.0) -> pb.ResolveImageResponse:
        return await self._first(lambda stub: stub.ResolveImage(request, timeout=timeout),
                                 lambda answer, peer: check_resolved(answer, peer=peer))

    async def access_traces(self, blob_digests: Sequence[str], manifest_digest: str = "", *,
                            timeout: float = QUERY_TIMEOUT) -> list[pb.AccessTrace]:
        """What tasks read first from these blobs (merged runs; blobs nobody reported are left out), checked
        for form and bounds (a replica answering about other blobs is skipped)."""
        request = pb.GetAccessTracesRequest(blob_digests=list(blob_digests), manifest_digest=manifest_digest)
        response = await self._first(lambda stub: stub.GetAccessTraces(request, timeout=timeout),
                                     lambda answer, peer: check_access_traces(answer, set(blob_digests), peer=peer))
        return list(response.traces)

    async def heartbeat(self, request: pb.HeartbeatRequest) -> int:
        """Send `request` to every address of every replica; return how many accepted it."""
        return await self._to_every_replica("heartbeat", lambda stub: stub.Heartbeat(request, timeout=HEARTBEAT_TIMEOUT))

    async def report_trace(self, request: pb.ReportAccessTraceRequest) -> int:
        """Report a run's access trace to every address of every replica; return how many accepted it."""
        return await self._to_every_replica(
            "access trace report", lambda stub: stub.ReportAccessTrace(request, timeout=HEARTBEAT_TIMEOUT))

    async def _to_every_replica(self, what: str,
                                call: Callable[[pb_grpc.ServiceDiscoveryStub], Awaitable[object]]) -> int:
        """With TLS, the replica at each address must show a certificate for the name it was resolved from."""
        addresses: dict[str, str | None] = {}   # address -> the name it was resolved from
        for endpoint in self.endpoints:
            for address in await expand_endpoint(endpoint):
                addresses.setdefault(address, resolved_name(endpoint))

        async def one(address: str, host: str | None) -> bool:
            try:
                await call(self._stub(address, host))
                return True
            except grpc.aio.AioRpcError as error:
                log.warning("%s to %s failed: %s %s", what, address, error.code().name, error.details())
                return False
        return sum(await asyncio.gather(*(one(address, host) for address, host in addresses.items())))
