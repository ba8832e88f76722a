"""Dispatch counts: this proxy's, and the cluster's summed over the peer proxies (`GET /status`).

A proxy counts its Execute calls in flight: `waiting` (not yet accepted by an afslet: the dispatch queue)
and `relaying` (accepted, being relayed). `dispatching` is their sum — the reference's
`local_dispatching`, kept under that name so reference peers and dashboards read it unchanged.

The cluster count asks every address `--proxy-peers-target` resolves to for its own counts
(`/status?include_cluster=false`) and sums them once per node_id: this proxy's own count is taken first,
so a peer list that includes this proxy (the usual case: one DNS name for all) does not count it twice,
nor does a proxy reachable at two addresses.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import httpx

from afsd.proxy.errors import TargetResolveError
from afsd.proxy.targets import resolve_target

MAX_PEER_BODY = 1 << 20


@dataclass
class DispatchCounts:
    waiting: int = 0
    relaying: int = 0

    @property
    def dispatching(self) -> int:
        return self.waiting + self.relaying


@dataclass(frozen=True)
class PeerAnswer:
    address: str
    node_id: str = ""
    waiting: int = 0
    relaying: int = 0
    dispatching: int = 0
    error: str = ""


async def status_report(node_id: str, counts: DispatchCounts, *, include_cluster: bool, peers_target: str,
                        timeout: float) -> dict[str, Any]:
    """The JSON body of `GET /status`."""
    report: dict[str, Any] = {
        "node_id": node_id, "include_cluster": include_cluster,
        "local_dispatching": counts.dispatching, "local_waiting": counts.waiting, "local_relaying": counts.relaying,
        "cluster_dispatching": counts.dispatching, "cluster_waiting": counts.waiting,
        "cluster_relaying": counts.relaying, "queried_peers": 0, "peer_errors": 0, "peers": [],
    }
    if not include_cluster or not peers_target:
        return report
    try:
        addresses = await resolve_target(peers_target)
    except TargetResolveError as error:
        report.update(peer_errors=1, peers=[{"address": peers_target, "error": str(error)}])
        return report
    async with httpx.AsyncClient(timeout=timeout, trust_env=False) as client:
        answers = await asyncio.gather(*(_ask(client, address) for address in addresses))
    counted = {node_id: (counts.dispatching, counts.waiting, counts.relaying)}
    for answer in answers:
        if not answer.error:
            counted.setdefault(answer.node_id, (answer.dispatching, answer.waiting, answer.relaying))
    report.update(
        cluster_dispatching=sum(c[0] for c in counted.values()), cluster_waiting=sum(c[1] for c in counted.values()),
        cluster_relaying=sum(c[2] for c in counted.values()), queried_peers=len(addresses),
        peer_errors=sum(1 for a in answers if a.error),
        peers=[{"address": a.address, "error": a.error} if a.error else
               {"address": a.address, "node_id": a.node_id, "local_dispatching": a.dispatching} for a in answers])
    return report


async def _ask(client: httpx.AsyncClient, address: str) -> PeerAnswer:
    try:
        response = await client.get(f"http://{address}/status", params={"include_cluster": "false"})
        if response.status_code != 200:
            return PeerAnswer(address, error=f"HTTP {response.status_code}")
        if len(response.content) > MAX_PEER_BODY:
            return PeerAnswer(address, error=f"answer larger than {MAX_PEER_BODY} bytes")
        body = response.json()
        node_id = str(body.get("node_id") or "")
        if not node_id:
            return PeerAnswer(address, error="answer without node_id")
        dispatching = int(body.get("local_dispatching", 0))
        return PeerAnswer(address, node_id, int(body.get("local_waiting", 0)),
                          int(body.get("local_relaying", dispatching)), dispatching)
    except (httpx.HTTPError, ValueError, TypeError, AttributeError) as error:
        return PeerAnswer(address, error=f"{type(error).__name__}: {error}")
