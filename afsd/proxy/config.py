"""The proxy's settings, from `afsd proxy`'s flags."""

from __future__ import annotations

from dataclasses import dataclass, field

from afsd.proxy.placement import Strategy
from afsd.proxy.retry import RetryDefaults


@dataclass(frozen=True)
class ProxyConfig:
    afslet_target: str                      # DNS HOST:PORT of the afslets
    node_id: str                            # this proxy's name in /status (peers deduplicate by it)
    discovery_target: str = ""              # DNS HOST:PORT of the discovery replicas
    proxy_peers_target: str = ""            # DNS HOST:PORT of every proxy's HTTP endpoint
    dial_timeout: float = 3.0               # reaching the chosen afslet
    status_timeout: float = 2.0             # each GetRuntimeStatus / FindProvider / peer /status
    resolve_timeout: float = 300.0          # discovery's ResolveImage (may have to ask a slow registry)
    ensure_timeout: float = 600.0           # a layerstore's EnsureLayers during a reconcile
    replica_wait: float = 15.0              # how long a reconcile waits for discovery to see the new copies
    retry: RetryDefaults = field(default_factory=RetryDefaults)
    strategy: Strategy = Strategy.P2C       # how a call's afslet is picked among the feasible ones
    prefer: tuple[str, ...] = ()            # local-first: HOST:PORT targets of the preferred afslets

    @property
    def handshake_timeout(self) -> float:
        """From opening Execute on an afslet to its `accepted` (connect, then its admission)."""
        return self.dial_timeout + self.status_timeout
