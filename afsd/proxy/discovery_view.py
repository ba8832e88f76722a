"""The layerstores as every discovery replica sees them, merged.

Discovery replicas are independent (each layerstore heartbeats each of them), so one replica may miss a
node another knows about, e.g. after a restart. The proxy asks every address `--discovery-target`
resolves to and keeps, per node, the freshest record (the reference asked one replica only).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import grpc

from afsd.api import discovery_pb2 as dpb
from afsd.api import discovery_pb2_grpc as dgrpc
from afsd.cluster.discovery_client import all_pages, resolved_name
from afsd.cluster.peer_answers import PeerAnswerError, check_services
from afsd.proxy.targets import resolve_target
from afsd.rpc import ChannelPool


@dataclass
class DiscoveryView:
    instances: list[dpb.ServiceInstance] = field(default_factory=list)  # sorted by node_id, endpoint
    errors: list[str] = field(default_factory=list)                     # one line per replica that failed
    replicas: int = 0                                                   # addresses asked


def layers_held(instance: dpb.ServiceInstance) -> set[str]:
    return set(instance.layer_digests) | {stat.digest for stat in instance.layer_stats}


async def discovery_view(target: str, channels: ChannelPool, timeout: float) -> DiscoveryView:
    """Raises TargetResolveError when the target does not resolve."""
    addresses = await resolve_target(target)
    host = resolved_name(target)   # each replica's certificate names the target, not its own address
    answers = await asyncio.gather(*(_ask(channels, address, host, timeout) for address in addresses))
    view = DiscoveryView(replicas=len(addresses))
    freshest: dict[tuple[str, str], dpb.ServiceInstance] = {}
    for address, answer in zip(addresses, answers):
        if isinstance(answer, str):
            view.errors.append(f"discovery {address}: {answer}")
            continue
        for instance in answer:
            key = (instance.node_id, instance.endpoint)
            known = freshest.get(key)
            if known is None or instance.last_seen_unix > known.last_seen_unix:
                freshest[key] = instance
    view.instances = [freshest[key] for key in sorted(freshest)]
    return view


async def _ask(channels: ChannelPool, address: str, host: str | None,
               timeout: float) -> list[dpb.ServiceInstance] | str:
    """Every node's whole record, page by page (one answer stays under discovery's size cap)."""
    stub = dgrpc.ServiceDiscoveryStub(channels.get(address, server_name=host))
    peer = f"discovery {address}"

    async def page(token: str) -> dpb.FindProviderResponse:
        response = await stub.FindProvider(dpb.FindProviderRequest(view=dpb.SERVICE_VIEW_FULL, page_token=token),
                                           timeout=timeout)
        check_services(response.services, peer=peer)
        return response
    try:
        return await all_pages(page, peer=peer)
    except grpc.aio.AioRpcError as error:
        return f"{error.code().name}: {error.details()}"
    except PeerAnswerError as error:
        return error.problem
