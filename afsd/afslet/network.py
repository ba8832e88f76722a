"""The containers' network, one of three modes (`afsd let --network`):

- `bridge` (default, as Docker): every container gets its own network namespace (runc makes it), and
  afslet attaches it to this afslet's bridge between `runc create` and `runc start` (afsd/net: veth pair,
  an address of the bridge's subnet, default route through the gateway, masquerading to the outside,
  the host's own services closed, containers isolated from each other). DNS: the host's resolv.conf with
  its local name servers (127.0.0.53-style, or one of the host's own addresses) replaced by the gateway,
  whose port 53 is forwarded to the first of them.
- `none`: a network namespace with loopback only.
- `host`: the host's network namespace — every service of the node is reachable; only when the
  operator says so.

Global names are unique per afslet instance: `<token>` is a hash of the work dir, so two afslets never
share a bridge (`afsb<token>`), veth (`afv<token><n>`) or nft table (`afsd-let-<token>`), and a successor
with the same work dir finds and removes what a crashed one left (`start()` does it first). The subnet is
the first /24 of `--bridge-pool` (10.213.0.0/16) that no route or address of the host overlaps, chosen
under a host-wide lock, starting at a slot derived from the token.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network, ip_address
from pathlib import Path

from afsd.net.bridge import DEFAULT_DENY, Attachment, BridgeNetwork, BridgeSpec, host_network_lock, pick_subnet
from afsd.net.links import open_links
from afsd.net.namespaces import Namespace

log = logging.getLogger(__name__)

MODES = ("bridge", "none", "host")
DEFAULT_POOL = IPv4Network("10.213.0.0/16")
SUBNET_PREFIX = 24


@dataclass(frozen=True)
class NetworkOptions:
    mode: str = "bridge"
    pool: IPv4Network = DEFAULT_POOL
    subnet: IPv4Network | None = None              # an explicit subnet instead of one from the pool
    deny: tuple[IPv4Network, ...] = DEFAULT_DENY   # destinations containers may not reach


def instance_token(work_dir: Path) -> str:
    return hashlib.sha256(str(work_dir.absolute()).encode()).hexdigest()[:8]


def instance_names(work_dir: Path) -> BridgeSpec:
    """The bridge, nft table and veth prefix of the afslet with this work dir (its subnet is a placeholder)."""
    token = instance_token(work_dir)
    return BridgeSpec(bridge=f"afsb{token}", subnet=IPv4Network("10.0.0.0/30"), table=f"afsd-let-{token}",
                      veth_prefix=f"afv{token}")


def remove_instance_network(work_dir: Path) -> None:
    """Remove the bridge, nft table and veths an afslet with this work dir left (nothing if none)."""
    BridgeNetwork(instance_names(work_dir)).remove_leftovers()


def container_resolv_conf(host_text: str, local: set[IPv4Address], gateway: IPv4Address
                          ) -> tuple[str, IPv4Address | None]:
    """The resolv.conf containers on the bridge get, and the host-local resolver the gateway stands in for.

    Name servers that are this host's own addresses (loopback included) are unreachable from the bridge:
    the first becomes the gateway (its port 53 is forwarded there), later ones are dropped. IPv6 ones are
    dropped (containers have IPv4 only). Everything else is kept as it is.
    """
    lines: list[str] = []
    target: IPv4Address | None = None
    for line in host_text.splitlines():
        fields = line.split()
        if len(fields) >= 2 and fields[0] == "nameserver":
            try:
                server = ip_address(fields[1].split("%")[0])
            except ValueError:
                continue
            if server.version != 4:
                continue
            if server.is_loopback or server in local:
                if target is None:
                    target = server  # type: ignore[assignment]
                    lines.append(f"nameserver {gateway}")
                continue
        lines.append(line)
    return "\n".join(lines) + "\n", target


@dataclass
class ContainerNetwork:
    """An afslet's network mode; for `bridge`, its bridge and the addresses in use."""

    options: NetworkOptions
    work_dir: Path
    host_resolv_conf: Path | None
    bridge: BridgeNetwork | None = None
    resolv_conf: Path | None = None        # what containers get at /etc/resolv.conf (None: none)
    _free: list[int] = field(default_factory=list)
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    @property
    def mode(self) -> str:
        return self.options.mode

    @property
    def own_namespace(self) -> bool:
        return self.mode != "host"

    @property
    def token(self) -> str:
        return instance_token(self.work_dir)

    async def start(self) -> str:
        """Set the mode up (removing what a predecessor left); returns a line describing it."""
        if self.mode != "bridge":
            self.resolv_conf = self.host_resolv_conf if self.host_resolv_conf and self.host_resolv_conf.is_file() \
                else None
            return f"network {self.mode}"
        return await asyncio.to_thread(self._start_bridge)

    def _start_bridge(self) -> str:
        host_text = self.host_resolv_conf.read_text() if self.host_resolv_conf and self.host_resolv_conf.is_file() \
            else ""
        with host_network_lock():
            leftover = instance_names(self.work_dir)
            BridgeNetwork(leftover).remove_leftovers()
            with open_links() as host:
                taken = host.ipv4_networks()
                local = set(host.ipv4_addresses())
                uplinks = tuple(sorted(set(host.default_route_interfaces())))
            subnet = self.options.subnet or pick_subnet(self.options.pool, SUBNET_PREFIX, taken,
                                                        int(self.token, 16))
            gateway = subnet.network_address + 1
            resolv_text, dns_target = container_resolv_conf(host_text, local, gateway)
            spec = BridgeSpec(bridge=leftover.bridge, subnet=subnet, table=leftover.table,
                              veth_prefix=leftover.veth_prefix, deny=self.options.deny, dns_target=dns_target,
                              uplinks=uplinks)
            self.bridge = BridgeNetwork(spec)
            self.bridge.up()
        directory = self.work_dir / "network"
        directory.mkdir(mode=0o711, exist_ok=True)
        self.resolv_conf = directory / "resolv.conf"
        self.resolv_conf.write_text(resolv_text)
        self.resolv_conf.chmod(0o644)
        self._free = list(spec.host_indexes)
        dns = f"DNS via the gateway to {dns_target}" if dns_target else "DNS: the host's name servers"
        changed = f"; enabled {', '.join(self.bridge.changed)}" if self.bridge.changed else ""
        return (f"network bridge {spec.bridge} {subnet} (gateway {gateway}, nft table inet {spec.table}, "
                f"masquerading, host services closed, denied {', '.join(map(str, spec.deny)) or 'nothing'}; "
                f"{dns}){changed}")

    async def attach(self, pid: int) -> Attachment | None:
        """Connect the network namespace of the container whose init is `pid` (bridge mode only)."""
        if self.bridge is None:
            return None
        async with self._lock:
            if not self._free:
                raise OSError(f"no free address left in {self.bridge.spec.subnet}")
            index = self._free.pop(0)
        try:
            return await asyncio.to_thread(self.bridge.attach, Namespace.of_process(pid), index)
        except BaseException:
            self._free.append(index)
            raise

    def describe(self, attachment: Attachment) -> str:
        assert self.bridge is not None
        return (f"eth0 {attachment.address} via {self.bridge.spec.gateway.ip} (bridge {self.bridge.spec.bridge}, "
                f"host veth {attachment.host_veth})")

    async def detach(self, attachment: Attachment | None) -> None:
        if attachment is None or self.bridge is None:
            return
        try:
            await asyncio.to_thread(self.bridge.detach, attachment)
        finally:
            self._free.append(attachment.index)

    async def stop(self) -> None:
        if self.bridge is not None:
            await asyncio.to_thread(self.bridge.down)
