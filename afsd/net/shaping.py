"""Traffic shaping hooks (tc through pyroute2): a token-bucket rate limit on one interface.

This host's kernel has the tbf, htb and ingress qdiscs, ifb and cls_bpf, but neither netem nor a qdisc
that honours departure times (fq, etf): a rate limit can be simulated here, added delay and loss cannot
(a BPF program may stamp a packet's departure time, but only fq/etf would hold it until then).
"""

from __future__ import annotations

from afsd.net.links import Links

MIN_BURST_BYTES = 64 * 1024
BURST_SECONDS = 0.001  # the bucket holds 1 ms at the full rate: high rates need more than one MTU per tick


def burst_for(rate_bits: int) -> int:
    """A bucket size that lets tbf reach `rate_bits` (its timer fires at most so often)."""
    return max(MIN_BURST_BYTES, int(rate_bits / 8 * BURST_SECONDS))


def limit_rate(links: Links, ifname: str, *, rate_bits: int, burst_bytes: int | None = None,
               latency_ms: int = 50) -> None:
    """Egress of `ifname` limited to `rate_bits` per second (tbf; replaces any root qdisc). `latency_ms`
    bounds the queue (packets that would wait longer are dropped), it adds no delay."""
    if rate_bits <= 0:
        raise ValueError(f"rate must be > 0 bits/s (got {rate_bits})")
    index = links.require_index(ifname)
    links.call(f"limiting {ifname} to {rate_bits} bit/s", "tc", "replace", kind="tbf", index=index,
                handle="1:", rate=f"{rate_bits}bit", burst=burst_bytes or burst_for(rate_bits),
                latency=f"{latency_ms}ms")


def clear_shaping(links: Links, ifname: str) -> None:
    """Remove the root qdisc of `ifname` (back to the default)."""
    index = links.require_index(ifname)
    try:
        links.call(f"removing shaping from {ifname}", "tc", "del", index=index, handle="1:", root=True)
    except OSError:
        pass  # nothing to remove
