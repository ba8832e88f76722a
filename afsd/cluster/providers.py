"""One provider of a blob as the fetcher (fetcher.py) sees it: its rank, cooldown and lease, and how a
failed call to it reads (give up on it for this read, or try it again after discovery is asked anew)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import grpc

from afsd.cluster.peers import LayerStorePeer
from afsd.retry import grpc_permanent

# AcquireLayerLease answers that mean "do not read from this one": it lacks the layer or is unreachable.
UNREACHABLE_CODES = frozenset({grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNAVAILABLE,
                                grpc.StatusCode.DEADLINE_EXCEEDED})


class ProviderFailure(Exception):
    """One provider could not serve one read; `retry` says whether a later round may try it again."""

    def __init__(self, reason: str, *, retry: bool) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry = retry


class ProviderUnusable(ProviderFailure):
    """The provider cannot serve the layer at all (an RPC ended with one of UNREACHABLE_CODES: it lacks the
    layer, cannot be reached, or stalled): a reader asks the next one, as when it refused a lease."""


def rpc_failure(error: grpc.aio.AioRpcError, what: str, timeout: float) -> ProviderFailure:
    code = error.code()
    kind = ProviderUnusable if code in UNREACHABLE_CODES else ProviderFailure
    if code == grpc.StatusCode.NOT_FOUND:
        return kind(f"does not hold the layer ({error.details()})", retry=False)
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        # Unlike the shared policy (afsd.retry), a provider that stalled is not given a second round:
        # a reader in the kernel is waiting, and another stall would double its wait.
        return kind(f"{what} did not finish within {timeout:g} s", retry=False)
    # Worth one more round after a discovery refresh unless any provider would answer the same.
    return kind(f"{what} failed: {code.name} {error.details()}", retry=not grpc_permanent(code))


@dataclass
class Provider:
    endpoint: str
    node_id: str
    local: bool
    peer: LayerStorePeer
    order: float                   # random rank among equals, fixed when first seen
    cooling_until: float = 0.0
    last_error: str = ""
    leases_supported: bool = True

    @property
    def label(self) -> str:
        return f"{self.endpoint} ({self.node_id})" if self.node_id else self.endpoint

    @property
    def source(self) -> str:
        return "local" if self.local else f"peer:{self.endpoint}"


@dataclass
class ProviderLease:
    """The provider in use, with the lease held on it (lease_id None: reading without one)."""

    provider: Provider
    lease_id: str | None
    renewer: asyncio.Task[None] | None
