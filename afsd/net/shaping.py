"""Traffic shaping hooks (tc through pyroute2): a token-bucket rate limit on one interface.

This host's kernel has the tbf, htb and ingress qdiscs and ifb, but no netem: a rate limit can be
simulated here, added delay and loss cannot.
"""

from __future__ import annotations

from afsd.net.links import Links


def limit_rate(links: Links, ifname: str, *, rate_bits: int, burst_bytes: int = 32 * 1024,
               latency_ms: int = 50) -> None:
    """Egress of `ifname` limited to `rate_bits` per second (tbf; replaces any root qdisc)."""
    if rate_bits <= 0:
        raise ValueError(f"rate must be > 0 bits/s (got {rate_bits})")
    index = links.require_index(ifname)
    links.call(f"limiting {ifname} to {rate_bits} bit/s", "tc", "replace", kind="tbf", index=index,
                handle="1:", rate=f"{rate_bits}bit", burst=burst_bytes, latency=f"{latency_ms}ms")


def clear_shaping(links: Links, ifname: str) -> None:
    """Remove the root qdisc of `ifname` (back to the default)."""
    index = links.require_index(ifname)
    try:
        links.call(f"removing shaping from {ifname}", "tc", "del", index=index, handle="1:", root=True)
    except OSError:
        pass  # nothing to remove
