"""afsd/net with real namespaces: a bridge network attaches a namespace, closes the host's services to
it, reaches "the internet" through the masquerade, and leaves nothing behind; plus its pure parts
(subnet choice, the nftables rules, the resolv.conf containers get)."""

from __future__ import annotations

import secrets
import socket
import urllib.request
from ipaddress import IPv4Address, IPv4Network

import pytest

from afsd.afslet.network import container_resolv_conf
from afsd.net.bridge import BridgeNetwork, BridgeSpec, host_network_lock, pick_subnet, ruleset
from afsd.net.links import open_links
from afsd.net.namespaces import create_namespace, delete_namespace, list_namespaces, run_in
from afsd.net.nft import NftTable, tables
from tests.support.internet import BODY, Internet


def test_pick_subnet_skips_every_network_the_host_uses() -> None:
    pool = IPv4Network("10.213.0.0/16")
    taken = [IPv4Network("10.213.5.0/24"), IPv4Network("10.213.6.128/25"), IPv4Network("10.0.0.0/8")]
    assert pick_subnet(pool, 24, taken[:2], first=5) == IPv4Network("10.213.7.0/24")
    assert pick_subnet(pool, 24, [], first=255 + 3) == IPv4Network("10.213.2.0/24")  # wraps around
    with pytest.raises(ValueError, match="overlaps a network this host already uses"):
        pick_subnet(pool, 24, taken)


def test_the_rules_reject_the_host_and_new_traffic_in_and_masquerade_out() -> None:
    spec = BridgeSpec(bridge="afsbX", subnet=IPv4Network("10.213.9.0/24"), table="t", veth_prefix="afvX",
                      dns_target=IPv4Address("127.0.0.53"))
    rules = ruleset(spec)
    assert 'iifname "afsbX" ct state established,related accept' in rules
    assert 'iifname "afsbX" reject with icmpx admin-prohibited' in rules       # any host address
    assert 'oifname "afsbX" reject with icmpx admin-prohibited' in rules       # nothing new in
    assert 'ip daddr { 169.254.0.0/16 } reject' in rules                       # the metadata service
    assert "dnat ip to 127.0.0.53:53" in rules and "ip daddr 10.213.9.1" in rules
    assert 'ip saddr 10.213.9.0/24 oifname != "afsbX" masquerade' in rules
    assert "policy drop" not in rules  # tables only narrow: never a dropping policy


def test_local_name_servers_are_reached_through_the_gateway() -> None:
    text = "search lab\nnameserver 127.0.0.53\nnameserver 192.0.2.2\nnameserver 8.8.8.8\nnameserver ::1\noptions x\n"
    resolv, target = container_resolv_conf(text, {IPv4Address("192.0.2.2")}, IPv4Address("10.213.9.1"))
    assert target == IPv4Address("127.0.0.53")
    assert resolv == "search lab\nnameserver 10.213.9.1\nnameserver 8.8.8.8\noptions x\n"
    resolv, target = container_resolv_conf("nameserver 9.9.9.9\n", set(), IPv4Address("10.213.9.1"))
    assert (resolv, target) == ("nameserver 9.9.9.9\n", None)



def _connect(namespace, address: str, port: int) -> str:
    def attempt() -> str:
        with socket.socket() as sock:
            sock.settimeout(5)
            try:
                sock.connect((address, port))
            except OSError as error:
                return error.strerror or str(error)
            return "connected"
    return run_in(namespace, attempt)


def test_an_attached_namespace_reaches_the_internet_but_no_host_address(internet: Internet) -> None:
    token = secrets.token_hex(4)
    with open_links() as host:
        with host_network_lock():
            subnet = pick_subnet(IPv4Network("10.213.0.0/16"), 24, host.ipv4_networks(), int(token, 16))
            spec = BridgeSpec(bridge=f"afsbt{token}", subnet=subnet, table=f"afsd-test-{token}",
                              veth_prefix=f"afvt{token}")
            network = BridgeNetwork(spec)
            network.up()
        host_addresses = [str(a) for a in host.ipv4_addresses() if not a.is_loopback]
    namespace = create_namespace(f"afsd-test-{token}")
    listener = socket.create_server(("0.0.0.0", 0))  # a host service on every address
    try:
        attachment = network.attach(namespace, 2)
        assert f"afsd-test-{token}" in list_namespaces("afsd-test-")
        for address in ["127.0.0.1", *host_addresses]:
            assert _connect(namespace, address, listener.getsockname()[1]) == "Connection refused", address
        assert spec.gateway.ip.exploded in host_addresses
        body = run_in(namespace, lambda: urllib.request.urlopen(internet.url, timeout=10).read())
        assert body == BODY
        # A second attached namespace: its own service is out of the first one's reach (isolated ports).
        neighbour = create_namespace(f"afsd-test-{token}-2")
        other = network.attach(neighbour, 3)
        service = run_in(neighbour, lambda: socket.create_server((str(other.address.ip), 8080)))
        try:
            assert _connect(namespace, str(other.address.ip), 8080) != "connected"
        finally:
            service.close()
        network.detach(other)
        network.detach(attachment)
    finally:
        listener.close()
        delete_namespace(f"afsd-test-{token}")
        delete_namespace(f"afsd-test-{token}-2")
        network.down()
    with open_links() as host:
        assert host.names(f"afvt{token}") == [] and host.index(spec.bridge) is None
    assert NftTable("inet", spec.table) not in tables("afsd-test-")
    assert f"afsd-test-{token}" not in list_namespaces("afsd-test-")
