"""rtnetlink in one network namespace, through pyroute2: `open_links(ns)` gives a `Links` whose methods
each do one thing (a bridge, a veth pair, an address, a route, a link up) and raise `LinkError` naming
the interface when the kernel refuses.

The netlink socket is opened inside the namespace (namespaces.run_in) and then used from the caller's
thread: a socket stays in the namespace it was created in.
"""

from __future__ import annotations

import errno
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from ipaddress import IPv4Address, IPv4Interface, IPv4Network, ip_network
from pathlib import Path

from afsd.net.namespaces import Namespace, run_in

NETLINK_ROUTE = 0
IFNAMSIZ = 15  # usable characters of an interface name


class LinkError(OSError):
    """The kernel refused a link, address or route change."""


def check_ifname(name: str) -> str:
    if not name or len(name) > IFNAMSIZ or "/" in name or any(c.isspace() for c in name):
        raise ValueError(f"bad interface name {name!r} (1-{IFNAMSIZ} characters, no '/' or spaces)")
    return name


class Links:
    """Link, address and route changes in one namespace (the one `open_links` was given)."""

    def __init__(self, ipr: object, namespace: Namespace | None) -> None:
        self._ipr = ipr
        self.namespace = namespace

    def call(self, what: str, method: str, *args: object, **kwargs: object) -> object:
        try:
            return getattr(self._ipr, method)(*args, **kwargs)
        except Exception as error:  # pyroute2's NetlinkError and friends
            where = f" in network namespace {self.namespace.name}" if self.namespace else ""
            code = getattr(error, "code", 0) or 0
            detail = os.strerror(code) if code else str(error)
            raise LinkError(code, f"{what}{where}: {detail}") from None

    def index(self, ifname: str) -> int | None:
        found = self._ipr.link_lookup(ifname=ifname)  # type: ignore[attr-defined]
        return found[0] if found else None

    def require_index(self, ifname: str) -> int:
        index = self.index(ifname)
        if index is None:
            where = f" in network namespace {self.namespace.name}" if self.namespace else ""
            raise LinkError(0, f"no interface {ifname}{where}")
        return index

    def names(self, prefix: str = "") -> list[str]:
        """Interface names starting with `prefix`."""
        links = self.call("listing interfaces", "get_links")
        names = (link.get_attr("IFLA_IFNAME") for link in links)  # type: ignore[union-attr]
        return sorted(name for name in names if name and name.startswith(prefix))

    def add_bridge(self, name: str) -> None:
        self.call(f"creating bridge {name}", "link", "add", ifname=check_ifname(name), kind="bridge")

    def add_veth(self, name: str, peer: str, peer_namespace: Namespace | None = None) -> None:
        """A veth pair: `name` here, `peer` in `peer_namespace` (here if None), both down."""
        spec: dict[str, object] = {"ifname": check_ifname(peer)}
        fd = -1
        if peer_namespace is not None:
            fd = os.open(peer_namespace.path, os.O_RDONLY | os.O_CLOEXEC)
            spec["net_ns_fd"] = fd
        try:
            self.call(f"creating veth {name} (peer {peer})", "link", "add", ifname=check_ifname(name),
                       kind="veth", peer=spec)
        finally:
            if fd >= 0:
                os.close(fd)

    def attach_to_bridge(self, ifname: str, bridge: str, *, isolated: bool = False) -> None:
        """Make `ifname` a port of `bridge`; `isolated` ports cannot reach each other, only the bridge."""
        self.call(f"adding {ifname} to bridge {bridge}", "link", "set", index=self.require_index(ifname),
                   master=self.require_index(bridge))
        if isolated:
            self.call(f"isolating bridge port {ifname}", "brport", "set", index=self.require_index(ifname),
                       isolated=1)

    def up(self, ifname: str) -> None:
        self.call(f"bringing {ifname} up", "link", "set", index=self.require_index(ifname), state="up")

    def delete(self, ifname: str) -> bool:
        """Remove the interface (a veth takes its peer with it); False if there was none, including one
        that went away meanwhile (a veth whose peer's namespace is being dismantled goes by itself)."""
        index = self.index(ifname)
        if index is None:
            return False
        try:
            self.call(f"deleting {ifname}", "link", "del", index=index)
        except LinkError as error:
            if error.errno == errno.ENODEV:
                return False
            raise
        return True

    def add_address(self, ifname: str, address: IPv4Interface) -> None:
        self.call(f"adding {address} to {ifname}", "addr", "add", index=self.require_index(ifname),
                   address=str(address.ip), prefixlen=address.network.prefixlen)

    def add_route(self, destination: IPv4Network | str, gateway: IPv4Address) -> None:
        """A route to `destination` ("default" or a network) through `gateway`."""
        dst = "0.0.0.0/0" if destination == "default" else str(destination)
        self.call(f"adding route to {destination} via {gateway}", "route", "add", dst=dst, gateway=str(gateway))

    def ipv4_networks(self) -> list[IPv4Network]:
        """Every IPv4 network this namespace has a route or an address in (what a new subnet must avoid)."""
        found: set[IPv4Network] = set()
        for route in self.call("listing routes", "get_routes", family=socket.AF_INET):  # type: ignore[union-attr]
            dst = route.get_attr("RTA_DST")
            if dst and route["dst_len"] > 0:
                found.add(ip_network(f"{dst}/{route['dst_len']}", strict=False))  # type: ignore[arg-type]
        for address in self.call("listing addresses", "get_addr", family=socket.AF_INET):  # type: ignore[union-attr]
            cidr = f"{address.get_attr('IFA_ADDRESS')}/{address['prefixlen']}"
            found.add(ip_network(cidr, strict=False))  # type: ignore[arg-type]
        return sorted(found)  # type: ignore[type-var]

    def default_route_interfaces(self) -> list[str]:
        """Names of the interfaces IPv4 default routes leave by (the uplinks)."""
        names = []
        for route in self.call("listing routes", "get_routes", family=socket.AF_INET):  # type: ignore[union-attr]
            if route["dst_len"] == 0 and route.get_attr("RTA_OIF"):
                found = self.call("looking up an interface", "get_links", route.get_attr("RTA_OIF"))
                names += [link.get_attr("IFLA_IFNAME") for link in found]  # type: ignore[union-attr]
        return names

    def ipv4_addresses(self) -> list[IPv4Address]:
        addresses = self.call("listing addresses", "get_addr", family=socket.AF_INET)
        return sorted(IPv4Address(a.get_attr("IFA_ADDRESS")) for a in addresses)  # type: ignore[union-attr]

    def set_sysctl(self, key: str, value: str) -> None:
        """A net.* sysctl of this namespace (e.g. "net/ipv4/conf/br0/forwarding")."""
        write_sysctl(self.namespace, key, value)

    def close(self) -> None:
        self._ipr.close()  # type: ignore[attr-defined]


def write_sysctl(namespace: Namespace | None, key: str, value: str) -> None:
    """Write /proc/sys/KEY as seen from `namespace` (net.* sysctls are per network namespace)."""
    path = Path("/proc/sys") / key.replace(".", "/") if "/" not in key else Path("/proc/sys") / key
    run_in(namespace, lambda: path.write_text(value))


def read_sysctl(namespace: Namespace | None, key: str) -> str:
    path = Path("/proc/sys") / key.replace(".", "/") if "/" not in key else Path("/proc/sys") / key
    return run_in(namespace, lambda: path.read_text().strip())


@contextmanager
def open_links(namespace: Namespace | None = None) -> Iterator[Links]:
    """`Links` for `namespace` (None: the caller's own), closed on exit."""
    from pyroute2 import IPRoute  # imported on first use: it takes a while

    sock = run_in(namespace, lambda: socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_ROUTE))
    ipr = IPRoute(fileno=sock.detach())
    links = Links(ipr, namespace)
    try:
        yield links
    finally:
        links.close()
