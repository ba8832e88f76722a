"""A real DNS server for tests: Debian's dnsmasq on a loopback address, answering from a hosts file the
test rewrites.

dnsmasq listens on port 53 of an address like 127.0.53.1 (port 53 because the system resolver knows no
other), with no upstream and no /etc/hosts: it knows exactly the names the test gives it, with TTL 0.
A daemon is pointed at it by running it under `afsd.lab.daemons.with_resolv_conf(dns.resolv_conf)`.
`set(name, addresses)` rewrites the file, makes dnsmasq re-read it (SIGHUP) and returns once dnsmasq
answers with the new addresses, so the next lookup of any process sees them.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import random
import shutil
import signal
import socket
import struct
import subprocess
import time
from pathlib import Path

from afsd.lab.processes import terminate

DNSMASQ = "dnsmasq"


def _port_53_free(address: str) -> bool:
    for kind in (socket.SOCK_DGRAM, socket.SOCK_STREAM):
        with socket.socket(socket.AF_INET, kind) as sock:
            try:
                sock.bind((address, 53))
            except OSError as error:
                if error.errno in (errno.EADDRINUSE, errno.EACCES):
                    return False
                raise
    return True


def query_a(server: str, name: str, timeout: float = 2.0) -> set[str]:
    """The A records `server` (port 53, UDP) gives for `name`; empty for NXDOMAIN or no data."""
    query_id = random.randrange(1 << 16)
    question = b"".join(bytes([len(label)]) + label.encode() for label in name.rstrip(".").split(".")) + b"\0"
    packet = struct.pack("!HHHHHH", query_id, 0x0100, 1, 0, 0, 0) + question + struct.pack("!HH", 1, 1)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(timeout)
        sock.sendto(packet, (server, 53))
        while True:
            reply, _ = sock.recvfrom(4096)
            if reply[:2] == packet[:2]:
                break
    _, flags, qdcount, ancount, _, _ = struct.unpack("!HHHHHH", reply[:12])
    if flags & 0x000F:  # an error code: NXDOMAIN, REFUSED, ...
        return set()
    offset = 12
    for _ in range(qdcount):
        offset = _skip_name(reply, offset) + 4
    found = set()
    for _ in range(ancount):
        offset = _skip_name(reply, offset)
        rtype, _, _, length = struct.unpack("!HHIH", reply[offset:offset + 10])
        offset += 10
        if rtype == 1 and length == 4:
            found.add(str(ipaddress.IPv4Address(reply[offset:offset + 4])))
        offset += length
    return found


def _skip_name(packet: bytes, offset: int) -> int:
    while True:
        length = packet[offset]
        if length & 0xC0 == 0xC0:  # a compression pointer ends the name
            return offset + 2
        if length == 0:
            return offset + 1
        offset += 1 + length


class DnsServer:
    """A running dnsmasq; `stop()` ends it."""

    def __init__(self, workdir: Path, address: str | None = None) -> None:
        """`address`: where it listens (port 53); by default a free 127.0.53.x."""
        if shutil.which(DNSMASQ) is None:
            raise RuntimeError("dnsmasq is not installed (Debian package dnsmasq-base; scripts/setup.sh installs it)")
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.address = address or next((f"127.0.53.{n}" for n in range(1, 250) if _port_53_free(f"127.0.53.{n}")),
                                       None)
        if self.address is None:
            raise RuntimeError("no 127.0.53.x address has port 53 free")
        self.hosts_path = workdir / "hosts"
        self.resolv_conf = workdir / "resolv.conf"
        self.log_path = workdir / "dnsmasq.log"
        self.records: dict[str, list[str]] = {}
        self.hosts_path.write_text("")
        self.resolv_conf.write_text(f"nameserver {self.address}\noptions timeout:1 attempts:2\n")
        self.process = subprocess.Popen(
            [DNSMASQ, "--keep-in-foreground", "--no-resolv", "--no-hosts", f"--addn-hosts={self.hosts_path}",
             f"--listen-address={self.address}", "--bind-interfaces", "--port=53", "--local-ttl=0",
             "--user=root", "--pid-file=", f"--log-facility={self.log_path}", "--log-queries"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
        self._wait_until(lambda: self._answers(), "dnsmasq to answer")

    def _answers(self) -> bool:
        if self.process.poll() is not None:
            raise RuntimeError(f"dnsmasq exited with {self.process.returncode}: "
                               f"{self.process.stderr.read().decode() if self.process.stderr else ''}")
        try:
            query_a(self.address, "nothing.afsd.test", timeout=0.5)
        except OSError:
            return False
        return True

    def set(self, name: str, addresses: list[str]) -> None:
        """`name` resolves to exactly `addresses` (none: the name is gone) from now on."""
        self.records[name] = list(addresses)
        lines = [f"{address} {host}\n" for host, found in self.records.items() for address in found]
        scratch = self.hosts_path.with_suffix(".new")
        scratch.write_text("".join(lines))
        os.replace(scratch, self.hosts_path)
        self.process.send_signal(signal.SIGHUP)
        self._wait_until(lambda: query_a(self.address, name) == set(addresses), f"{name} -> {addresses} in dnsmasq")

    def _wait_until(self, done: object, what: str, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while not done():  # type: ignore[operator]
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}")
            time.sleep(0.05)

    def stop(self) -> None:
        terminate(self.process, 10)
        if self.process.stderr is not None:
            self.process.stderr.close()
