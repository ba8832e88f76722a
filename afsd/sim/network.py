"""The simulation's network: one private bridge, a network namespace per member (registry, discovery
replicas, nodes) with its own address on it, and each member's link rate-limited both ways.

Built from afsd/net: a `BridgeNetwork` that is not sandboxed (ports not isolated, no nftables table, so
members reach each other and the host), `create_namespace` for the members, and tbf on both ends
of each veth pair (the host side shapes what the member receives, the member's side what it sends),
so that a member's link, not loopback, is what members contend for. This kernel cannot add latency
(no netem, no fq/etf): the only delay is the veth pair's own (see afsd/net/shaping.py).

Every global name carries the simulation's token (`afsim-<token>-…` namespaces, `asb<token>` bridge,
`asv<token>…` veths), so parallel simulations never touch each other's objects.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network

from afsd.net.bridge import BridgeNetwork, BridgeSpec, host_network_lock, pick_subnet
from afsd.net.links import open_links
from afsd.net.namespaces import Namespace, create_namespace, delete_namespace, list_namespaces
from afsd.net.shaping import limit_rate

SIM_POOL = IPv4Network("10.231.0.0/16")
SIM_PREFIXLEN = 23  # 509 addresses: room for hundreds of nodes


class TokenInUseError(RuntimeError):
    """Another simulation on this host already uses the token's names."""


@dataclass(frozen=True)
class Member:
    """One namespace on the simulated network."""

    name: str              # "registry", "discovery0", "node3", ...
    namespace: Namespace
    address: IPv4Address
    inode: int             # the namespace's inode: how its processes are recognised (/proc/PID/ns/net)

    def enter(self) -> list[str]:
        """A command prefix that runs a program in this member's network namespace (and nothing else:
        mounts it makes are the host's, so the host can look at them)."""
        return ["nsenter", f"--net={self.namespace.path}"]

    def endpoint(self, port: int) -> str:
        return f"{self.address}:{port}"


@dataclass
class SimNetwork:
    token: str
    rate_bits: int | None = None          # per member link, each direction; None: unshaped
    members: dict[str, Member] = field(default_factory=dict)
    _bridge: BridgeNetwork | None = None
    _claimed: bool = False   # the token's names were free and are ours: only then does down() remove them

    @property
    def namespace_prefix(self) -> str:
        return f"afsim-{self.token}-"

    @property
    def bridge_name(self) -> str:
        return f"asb{self.token}"

    @property
    def veth_prefix(self) -> str:
        return f"asv{self.token}"

    @property
    def subnet(self) -> IPv4Network:
        assert self._bridge is not None, "the network is not up"
        return self._bridge.spec.subnet

    def up(self) -> None:
        """Claim the token's names and create the bridge. TokenInUseError (and nothing touched) when
        another simulation on this host holds the same token."""
        with host_network_lock():
            in_use = self.leftovers()
            if in_use:
                raise TokenInUseError(f"simulation token {self.token} is in use on this host ({in_use[0]})")
            self._claimed = True
            with open_links() as host:
                taken = host.ipv4_networks()
            subnet = pick_subnet(SIM_POOL, SIM_PREFIXLEN, taken, first=int(self.token, 16))
            spec = BridgeSpec(bridge=self.bridge_name, subnet=subnet, table=f"afsd-sim-{self.token}",
                              veth_prefix=self.veth_prefix, sandboxed=False)
            self._bridge = BridgeNetwork(spec)
            self._bridge.up()

    def add(self, name: str) -> Member:
        """A new namespace `name` on the bridge, with the next free address, its link shaped."""
        assert self._bridge is not None, "the network is not up"
        index = len(self.members) + 2
        namespace = create_namespace(self.namespace_prefix + name)
        try:
            attachment = self._bridge.attach(namespace, index)
            if self.rate_bits:
                with open_links() as host:
                    limit_rate(host, attachment.host_veth, rate_bits=self.rate_bits)
                with open_links(namespace) as inside:
                    limit_rate(inside, "eth0", rate_bits=self.rate_bits)
        except BaseException:
            delete_namespace(namespace.name)
            raise
        member = Member(name, namespace, attachment.address.ip, os.stat(namespace.path).st_ino)
        self.members[name] = member
        return member

    def down(self) -> None:
        """Remove the bridge and its veths, then unpin every member namespace (a namespace itself goes
        when its last process does: census.py finds and ends those first). Nothing when the token's
        names were never claimed (another simulation's)."""
        if not self._claimed:
            return
        if self._bridge is not None:
            self._bridge.down()
        for name in list_namespaces(self.namespace_prefix):
            delete_namespace(name)

    def leftovers(self) -> list[str]:
        """Namespaces and interfaces of this network still on the host."""
        found = [f"network namespace {name}" for name in list_namespaces(self.namespace_prefix)]
        with open_links() as host:
            found += [f"interface {name}" for name in host.names(self.veth_prefix)]
            found += [f"interface {name}" for name in host.names(self.bridge_name)]
        return found
