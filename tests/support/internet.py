"""A stand-in for "the internet" in a network namespace of its own: an HTTP server on an address that is
not the host's, reached from the host through a veth pair (the host side is an uplink: forwarding on).

`Internet.start()` picks a free /30 (under the same host-wide lock `afsd.net` uses for bridges), creates
the namespace `afsd-inet-<token>` and the veth `ai<token>`, and serves `BODY` on port 80 from a thread
of this process whose listening socket lives in that namespace. `stop()` removes everything. The
fixture `internet` (module-scoped) does both around a test module.
"""

from __future__ import annotations

import http.server
import secrets
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from ipaddress import IPv4Interface, IPv4Network

import pytest

from afsd.net.bridge import host_network_lock, pick_subnet
from afsd.net.links import open_links, write_sysctl
from afsd.net.namespaces import Namespace, create_namespace, delete_namespace, run_in

POOL = IPv4Network("10.214.0.0/16")
BODY = b"hello from the internet namespace\n"


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        self.send_response(200)
        self.send_header("Content-Length", str(len(BODY)))
        self.end_headers()
        self.wfile.write(BODY)

    def log_message(self, *args: object) -> None:
        pass


@dataclass
class Internet:
    token: str = field(default_factory=lambda: secrets.token_hex(4))
    subnet: IPv4Network | None = None
    namespace: Namespace | None = None
    _server: http.server.HTTPServer | None = None

    @property
    def veth(self) -> str:
        return f"ai{self.token}"

    @property
    def server_address(self) -> str:
        assert self.subnet is not None
        return str(self.subnet.network_address + 2)

    @property
    def url(self) -> str:
        return f"http://{self.server_address}/"

    def start(self) -> Internet:
        self.namespace = create_namespace(f"afsd-inet-{self.token}")
        with host_network_lock():
            with open_links() as host:
                self.subnet = pick_subnet(POOL, 30, host.ipv4_networks(), int(self.token, 16) % 16384)
                host.add_veth(self.veth, "eth0", self.namespace)
                host.add_address(self.veth, IPv4Interface(f"{self.subnet.network_address + 1}/30"))
                host.up(self.veth)
        write_sysctl(None, f"net/ipv4/conf/{self.veth}/forwarding", "1")
        with open_links(self.namespace) as inside:
            inside.up("lo")
            inside.add_address("eth0", IPv4Interface(f"{self.server_address}/30"))
            inside.up("eth0")
        listener = run_in(self.namespace, lambda: socket.create_server((self.server_address, 80)))
        self._server = http.server.HTTPServer((self.server_address, 80), _Handler, bind_and_activate=False)
        self._server.socket.close()
        self._server.socket = listener
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        with open_links() as host:
            host.delete(self.veth)
        delete_namespace(f"afsd-inet-{self.token}")


@pytest.fixture(scope="module")
def internet() -> Iterator[Internet]:
    net = Internet().start()
    try:
        yield net
    finally:
        net.stop()
