"""`HOST:PORT` targets resolved through the system resolver, again at every use.

The afslets (`--afslet-target`), the discovery replicas (`--discovery-target`) and the peer proxies
(`--proxy-peers-target`) are each one DNS name with one record per instance, so scaling them up or down
is a DNS change that the proxy sees at its next lookup, without a restart. Nothing is cached here: the
resolver (and the DNS server's TTLs) decide how fresh an answer is.
"""

from __future__ import annotations

import asyncio
import logging
import socket

from afsd.cluster.discovery_client import join_host_port, split_host_port
from afsd.proxy.errors import TargetResolveError

log = logging.getLogger(__name__)

DNS_TIMEOUT = 3.0


async def resolve_target(target: str, *, timeout: float = DNS_TIMEOUT) -> list[str]:
    """Every address (A and AAAA) the target's host resolves to, as sorted `host:port` strings
    (`[v6]:port` for IPv6); a literal IP as is. Raises TargetResolveError when there is none."""
    try:
        host, port = split_host_port(target)
    except ValueError as error:
        raise TargetResolveError(str(error)) from None
    loop = asyncio.get_running_loop()
    try:
        infos = await asyncio.wait_for(loop.getaddrinfo(host, port, type=socket.SOCK_STREAM), timeout)
    except TimeoutError:
        raise TargetResolveError(f"DNS lookup of {host} timed out after {timeout:g}s") from None
    except OSError as error:
        raise TargetResolveError(f"cannot resolve {host}: {error.strerror or error}") from None
    addresses = sorted({join_host_port(info[4][0], port) for info in infos})
    if not addresses:
        raise TargetResolveError(f"{host} resolves to no address")
    return addresses


def with_default_port(value: str, port: int) -> str:
    """`HOST`, `HOST:PORT`, `IPv6` or `[IPv6]:PORT` as a `HOST:PORT` target (`port` when it has none).
    Raises ValueError for an empty host or a port that is not a number."""
    text = value.strip()
    if text.startswith("["):
        host, bracket, rest = text[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            raise ValueError(f"invalid address {value!r}: expected HOST, HOST:PORT or [IPv6]:PORT")
        text_port = rest[1:] if rest else str(port)
    elif text.count(":") == 1:
        host, _, text_port = text.partition(":")
    else:  # a host name, an IPv4 address, or a bare IPv6 address
        host, text_port = text, str(port)
    if not host or not text_port.isdigit():
        raise ValueError(f"invalid address {value!r}: expected HOST, HOST:PORT or [IPv6]:PORT")
    return join_host_port(host, int(text_port))


async def resolve_preferred(targets: tuple[str, ...], afslet_target: str) -> frozenset[str]:
    """Every address the preferred targets (`--prefer`, as HOST:PORT) resolve to now. A name that does not
    resolve prefers nothing: local-first then falls back to the other afslets, as when the preferred ones
    are full."""
    found = await asyncio.gather(*(resolve_target(target) for target in targets), return_exceptions=True)
    addresses: set[str] = set()
    for target, result in zip(targets, found):
        if isinstance(result, TargetResolveError):
            log.debug("preferred afslets %s (of %s): %s", target, afslet_target, result)
        elif isinstance(result, BaseException):
            raise result
        else:
            addresses.update(result)
    return frozenset(addresses)
