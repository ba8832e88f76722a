"""A bridge network on this host: namespaces attached by veth pairs to one bridge, with addresses from
its subnet, a default route through the bridge's address (the gateway), masquerading to the outside,
and none of the host's own services reachable.

What the nftables table of a `BridgeNetwork` does (one `inet` table, its own, loaded atomically):
- input: from the bridge, only replies (established/related) and DNS to the resolver the gateway stands
  in for reach the host; everything else addressed to ANY host address (the gateway, the uplink's,
  loopback routed in) is rejected — so daemons listening on 0.0.0.0 or on the node's address are closed;
- forward: nothing new enters the bridge from outside (nor from another bridge); traffic leaving it is
  refused to the `deny` networks (e.g. 169.254.0.0/16, the cloud metadata service) and IPv6 is dropped;
- nat: masquerade of the subnet to the outside; the gateway's port 53 (udp and tcp) is DNATed to
  `dns_target` when the host's resolver is a local address (127.0.0.53-style), which needs
  route_localnet on the bridge.
Ports are isolated (IFLA_BRPORT_ISOLATED): attached namespaces reach the gateway, never each other.
The bridge has no IPv6 (disable_ipv6), so nothing is reachable over link-local addresses either.

Forwarding is switched on for the bridge and for the `uplinks` only (per interface, not the global
net.ipv4.ip_forward), and left on at `down()`: other users of those interfaces may rely on it.
"""

from __future__ import annotations

import fcntl
import logging
import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Interface, IPv4Network
from pathlib import Path

from afsd.net.links import check_ifname, open_links, read_sysctl, write_sysctl
from afsd.net.namespaces import Namespace
from afsd.net.nft import NftTable

log = logging.getLogger(__name__)

LOCK_PATH = Path("/run/afsd/net.lock")
DEFAULT_DENY = (IPv4Network("169.254.0.0/16"),)


@dataclass(frozen=True)
class BridgeSpec:
    bridge: str                   # the bridge interface's name (unique to its owner)
    subnet: IPv4Network
    table: str                    # the nftables table's name (family inet)
    veth_prefix: str              # host-side veth names: prefix + a number (unique to its owner)
    deny: tuple[IPv4Network, ...] = DEFAULT_DENY
    dns_target: IPv4Address | None = None  # a host-local resolver, reached at the gateway's port 53
    uplinks: tuple[str, ...] = ()          # interfaces traffic leaves by: forwarding is enabled on them
    # False: a plain network of peers (e.g. a simulated cluster's pod network): no nftables table (the
    # host's services stay reachable, nothing is masqueraded) and ports not isolated from each other.
    sandboxed: bool = True

    def __post_init__(self) -> None:
        check_ifname(self.bridge)
        check_ifname(self.veth_prefix + "fff")
        if self.subnet.num_addresses < 4:
            raise ValueError(f"subnet {self.subnet} is too small for a gateway and an attached namespace")

    @property
    def gateway(self) -> IPv4Interface:
        return IPv4Interface(f"{self.subnet.network_address + 1}/{self.subnet.prefixlen}")

    @property
    def nft_table(self) -> NftTable:
        return NftTable("inet", self.table)

    @property
    def host_indexes(self) -> range:
        """The address indexes attachments get (gateway and broadcast excluded)."""
        return range(2, self.subnet.num_addresses - 1)

    def address(self, index: int) -> IPv4Interface:
        return IPv4Interface(f"{self.subnet.network_address + index}/{self.subnet.prefixlen}")

    def veth(self, index: int) -> str:
        return f"{self.veth_prefix}{index:x}"


def ruleset(spec: BridgeSpec) -> str:
    """The body of the bridge's nftables table (see the module docstring)."""
    br, gw = f'"{spec.bridge}"', spec.gateway.ip
    reject = "reject with icmpx admin-prohibited"
    input_rules = [f"iifname {br} ct state established,related accept"]
    nat_rules: list[str] = []
    if spec.dns_target is not None:
        input_rules.append(f"iifname {br} ct status dnat ip daddr {spec.dns_target} meta l4proto {{ tcp, udp }} "
                           "th dport 53 accept")
        nat_rules.append(f"iifname {br} ip daddr {gw} meta l4proto {{ tcp, udp }} th dport 53 "
                         f"dnat ip to {spec.dns_target}:53")
    input_rules += [f"iifname {br} meta l4proto tcp reject with tcp reset", f"iifname {br} {reject}"]
    forward_rules = [f"oifname {br} ct state established,related accept", f"oifname {br} {reject}",
                     f"iifname {br} meta nfproto ipv6 drop"]
    if spec.deny:
        forward_rules.append(f"iifname {br} ip daddr {{ {', '.join(map(str, spec.deny))} }} {reject}")

    def chain(name: str, hook: str, rules: list[str]) -> str:
        body = "".join(f"\t\t{rule}\n" for rule in rules)
        return f"\tchain {name} {{\n\t\t{hook}\n{body}\t}}\n"

    return "".join([
        chain("input", "type filter hook input priority filter; policy accept;", input_rules),
        chain("forward", "type filter hook forward priority filter; policy accept;", forward_rules),
        chain("prerouting", "type nat hook prerouting priority dstnat; policy accept;", nat_rules),
        chain("postrouting", "type nat hook postrouting priority srcnat; policy accept;",
              [f"ip saddr {spec.subnet} oifname != {br} masquerade"]),
    ])


def pick_subnet(pool: IPv4Network, prefixlen: int, taken: Iterable[IPv4Network], first: int = 0) -> IPv4Network:
    """The first /prefixlen of `pool`, starting at the `first`-th (wrapping around), that overlaps
    nothing in `taken`; ValueError if every one does."""
    candidates = list(pool.subnets(new_prefix=prefixlen))
    taken = list(taken)
    for step in range(len(candidates)):
        candidate = candidates[(first + step) % len(candidates)]
        if not any(candidate.overlaps(other) for other in taken):
            return candidate
    raise ValueError(f"every /{prefixlen} of {pool} overlaps a network this host already uses")


@contextmanager
def host_network_lock() -> Iterator[None]:
    """Serialises choosing a subnet and creating its bridge among all afsd processes of this host."""
    LOCK_PATH.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(LOCK_PATH, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


@dataclass(frozen=True)
class Attachment:
    namespace: Namespace
    index: int
    address: IPv4Interface
    host_veth: str


@dataclass
class BridgeNetwork:
    """One bridge and its rules; `up()` first, then `attach`/`detach` namespaces, `down()` at the end."""

    spec: BridgeSpec
    changed: list[str] = field(default_factory=list)  # host settings `up()` changed, for the owner's log

    def up(self) -> None:
        """Create the bridge and its table, replacing whatever an earlier owner of the names left."""
        spec = self.spec
        self.remove_leftovers()
        with open_links() as links:
            links.add_bridge(spec.bridge)
            self._set(None, f"net/ipv6/conf/{spec.bridge}/disable_ipv6", "1")
            links.add_address(spec.bridge, spec.gateway)
            links.up(spec.bridge)
        self._set(None, f"net/ipv4/conf/{spec.bridge}/forwarding", "1")
        if spec.dns_target is not None and spec.dns_target.is_loopback:
            self._set(None, f"net/ipv4/conf/{spec.bridge}/route_localnet", "1")
        for uplink in spec.uplinks:
            self._set(None, f"net/ipv4/conf/{uplink}/forwarding", "1", note=True)
        if spec.sandboxed:
            spec.nft_table.load(ruleset(spec))

    def _set(self, namespace: Namespace | None, key: str, value: str, *, note: bool = False) -> None:
        if read_sysctl(namespace, key) != value:
            write_sysctl(namespace, key, value)
            if note:
                self.changed.append(f"{key.replace('/', '.')}={value}")

    def down(self) -> None:
        """Remove the table, the bridge and every veth of this network still on the host."""
        self.remove_leftovers()

    def remove_leftovers(self) -> None:
        spec = self.spec
        spec.nft_table.delete()
        with open_links() as links:
            for name in links.names(spec.veth_prefix):
                links.delete(name)
            links.delete(spec.bridge)

    def attach(self, namespace: Namespace, index: int, *, ifname: str = "eth0") -> Attachment:
        """Connect `namespace` to the bridge: a veth pair (host side isolated on a sandboxed bridge, `ifname`
        inside with the index-th address of the subnet), loopback up, default route via the gateway."""
        spec = self.spec
        if index not in spec.host_indexes:
            raise ValueError(f"address index {index} is outside {spec.subnet}'s usable range")
        attachment = Attachment(namespace, index, spec.address(index), spec.veth(index))
        with open_links() as host:
            host.add_veth(attachment.host_veth, ifname, namespace)
            try:
                self._set(None, f"net/ipv6/conf/{attachment.host_veth}/disable_ipv6", "1")
                host.attach_to_bridge(attachment.host_veth, spec.bridge, isolated=spec.sandboxed)
                host.up(attachment.host_veth)
                with open_links(namespace) as inside:
                    inside.up("lo")
                    inside.add_address(ifname, attachment.address)
                    inside.up(ifname)
                    inside.add_route("default", spec.gateway.ip)
            except BaseException:
                host.delete(attachment.host_veth)
                raise
        return attachment

    def detach(self, attachment: Attachment) -> None:
        """Remove the attachment's veth pair (gone already if its namespace died)."""
        with open_links() as links:
            links.delete(attachment.host_veth)


