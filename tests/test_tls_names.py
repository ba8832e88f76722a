"""Replicas behind one DNS name share a certificate for that name (a Kubernetes Service's, e.g. issued by
cert-manager), not for each replica's address: heartbeats and the proxy's discovery view dial every
address the name resolves to and check the certificate against the name. A fake discovery replica
speaking the real protocol over real mutual TLS, with a certificate naming `localhost` only."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from afsd.api import discovery_pb2 as pb
from afsd.api import discovery_pb2_grpc as pb_grpc
from afsd.cluster.discovery_client import DiscoveryClient, resolved_name
from afsd.lab.pki import LabPki
from afsd.proxy.discovery_view import discovery_view
from afsd.rpc import ChannelPool, add_port, new_server
from afsd.trust.tls import TlsConfig


class OneNodeDiscovery(pb_grpc.ServiceDiscoveryServicer):
    def __init__(self) -> None:
        self.heartbeats: list[str] = []

    async def Heartbeat(self, request: pb.HeartbeatRequest, context: grpc.aio.ServicerContext) -> pb.HeartbeatResponse:
        self.heartbeats.append(request.node_id)
        return pb.HeartbeatResponse(expires_in_seconds=30)

    async def FindProvider(self, request: pb.FindProviderRequest,
                           context: grpc.aio.ServicerContext) -> pb.FindProviderResponse:
        return pb.FindProviderResponse(services=[pb.ServiceInstance(node_id="node-a", endpoint="10.0.0.5:50051")])


@pytest.fixture
async def replica(tmp_path: Path) -> AsyncIterator[tuple[LabPki, OneNodeDiscovery, int]]:
    pki = LabPki(tmp_path / "pki")
    tls = TlsConfig.from_dir(pki.node("afsd-discovery", "localhost")).check()   # a name, no IP
    service = OneNodeDiscovery()
    server = new_server(tls)
    pb_grpc.add_ServiceDiscoveryServicer_to_server(service, server)
    port = add_port(server, "127.0.0.1:0", tls)
    await server.start()
    try:
        yield pki, service, port
    finally:
        await server.stop(None)


def test_only_a_name_is_verified_as_a_name() -> None:
    assert resolved_name("afsd-discovery:60051") == "afsd-discovery"
    assert resolved_name("10.0.0.7:60051") is None and resolved_name("[::1]:60051") is None


async def test_heartbeats_reach_each_address_of_a_name_its_certificate_names(replica) -> None:
    pki, service, port = replica
    channels = ChannelPool(TlsConfig.from_dir(pki.node("node-a", "10.0.0.5")).check())
    beat = pb.HeartbeatRequest(node_id="node-a", endpoint="10.0.0.5:50051")
    try:
        assert await DiscoveryClient([f"localhost:{port}"], channels).heartbeat(beat) == 1
        # Dialled by its address, the replica's certificate (which names no IP) is refused.
        assert await DiscoveryClient([f"127.0.0.1:{port}"], channels).heartbeat(beat) == 0
    finally:
        await channels.close()
    assert service.heartbeats == ["node-a"]


async def test_the_proxys_discovery_view_checks_each_replica_against_the_name(replica) -> None:
    pki, _, port = replica
    channels = ChannelPool(TlsConfig.from_dir(pki.node("afsd-proxy", "localhost")).check())
    try:
        view = await discovery_view(f"localhost:{port}", channels, timeout=10)
        assert [(i.node_id, i.endpoint) for i in view.instances] == [("node-a", "10.0.0.5:50051")]
        refused = await discovery_view(f"127.0.0.1:{port}", channels, timeout=10)
        assert refused.instances == [] and refused.errors and "UNAVAILABLE" in refused.errors[0]
    finally:
        await channels.close()
