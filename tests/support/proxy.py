"""A real proxy cluster for tests: afslets on distinct loopback addresses behind a DNS name, and proxies
that find them through a real DNS server.

`start_proxy_cluster` starts the afslet test cluster (`tests/support/afslet.py`: registry, discovery,
layerstore, node daemon, the afslet `afslet0` on 127.0.0.1 and the test images), then dnsmasq
(`tests/support/dns.py`) and afslets on the addresses asked for (127.0.0.2, 127.0.0.3 ...), all on one
port and all mounting through the same node daemon. `afslets.afsd.test` resolves to the addresses
published with `publish_afslets`; proxies run in a private mount namespace whose /etc/resolv.conf points
at dnsmasq. One cluster serves a test module (`module_proxy_cluster`); the module also gets the afslet
support's `nothing_left_behind` check (through its `afslet_cluster` fixture) and `proxies_idle`.

Clients are the published afs-sdk in a separate process (`sdk_proxy_client.py`), as for afslet tests.
"""

from __future__ import annotations

import json
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from afsd.lab.daemons import (
    SHORT_STOP_TIMEOUTS,
    Daemon,
    afslet_daemon,
    http_address,
    proxy_daemon,
    start_all,
)
from afsd.lab.ports import PortReservation, reserve_shared_port
from tests.support.afslet import AfsletCluster, CallResult, SdkCall, start_afslet_cluster
from tests.support.dns import DnsServer
from tests.support.metrics import daemon_metrics, metric, scrape  # noqa: F401 - metric: for the proxy tests

SDK_PROXY_CLIENT = Path(__file__).with_name("sdk_proxy_client.py")
AFSLETS = "afslets.afsd.test"


@dataclass
class ProxyCluster:
    base: AfsletCluster
    dns: DnsServer
    afslet_ports: dict[str, PortReservation]   # one port, held on every afslet (and spare) address
    afslets: dict[str, Daemon] = field(default_factory=dict)   # by loopback address
    proxies: list[Daemon] = field(default_factory=list)

    @property
    def afslet_port(self) -> int:
        return next(iter(self.afslet_ports.values())).port

    @property
    def workdir(self) -> Path:
        return self.base.workdir

    @property
    def afslet_target(self) -> str:
        return f"{AFSLETS}:{self.afslet_port}"

    def start_afslets(self, hosts: list[str], *, limit_cpu: int = 2, limit_memory_mb: int = 1024,
                      extra_args: list[str] = ()) -> list[Daemon]:
        """Afslets on `hosts`, all on `afslet_port` (so one DNS name with a record per host reaches them);
        each gets `--node-id afslet-HOST`."""
        daemons = [afslet_daemon(self.workdir, f"afslet-{host}", self.base.node, [self.base.discovery.address],
                                 limit_cpu=limit_cpu, limit_memory_mb=limit_memory_mb, host=host,
                                 listen=self.afslet_ports[host], stop_timeouts=SHORT_STOP_TIMEOUTS,
                                 extra_args=["--mount-backend", "eager", "--node-id", f"afslet-{host}", *extra_args])
                   for host in hosts]
        self.base.extra_afslets += daemons  # stopped, swept and checked with the afslet cluster's
        start_all(daemons)
        self.afslets.update(zip(hosts, daemons))
        return daemons

    def publish_afslets(self, hosts: list[str], name: str = AFSLETS) -> None:
        """`name` (by default `afslets.afsd.test`, the proxies' afslet target) resolves to `hosts` from now on."""
        self.dns.set(name, hosts)

    def start_proxy(self, name: str, *, host: str = "127.0.0.1", http: PortReservation | None = None,
                    discovery_target: str = "", peers_target: str = "", afslets_name: str = AFSLETS,
                    extra_args: list[str] = ()) -> Daemon:
        """A proxy whose afslets are what `afslets_name` resolves to (on `afslet_port`)."""
        proxy = proxy_daemon(self.workdir, name, f"{afslets_name}:{self.afslet_port}", host=host, http=http,
                             discovery_target=discovery_target, peers_target=peers_target,
                             resolv_conf=self.dns.resolv_conf, extra_args=list(extra_args))
        self.proxies.append(proxy)
        proxy.start()
        return proxy

    def restart_afslet(self, host: str) -> None:
        """After a kill: the successor cleans up what the killed one left (containers, mounts, sessions)."""
        self.afslets[host].start()
        self.base.wait_idle(self.afslets[host])

    def stop(self) -> None:
        for proxy in self.proxies:
            proxy.stop()
            proxy.release()
        self.dns.stop()
        self.base.stop()
        for reservation in self.afslet_ports.values():
            reservation.close()


def start_proxy_cluster(workdir: Path, afslet_hosts: list[str], *, spare_hosts: list[str] = (),
                        **afslet_options: int) -> ProxyCluster:
    """`spare_hosts`: addresses where a test may start more afslets later (the shared port is free there too)."""
    base = start_afslet_cluster(workdir)
    dns = None
    try:
        dns = DnsServer(workdir / "dns")
        hosts = [*afslet_hosts, *spare_hosts]
        cluster = ProxyCluster(base, dns, dict(zip(hosts, reserve_shared_port(hosts))))
        cluster.start_afslets(afslet_hosts, **afslet_options)
        cluster.publish_afslets(afslet_hosts)
        return cluster
    except BaseException:
        if dns is not None:
            dns.stop()
        base.stop()
        raise


def module_proxy_cluster(name: str, afslet_hosts: list[str], *, spare_hosts: list[str] = (),
                         **afslet_options: int) -> Callable[..., Iterator[ProxyCluster]]:
    """A module-scoped `proxy_cluster` fixture (assign it in the test module)."""

    @pytest.fixture(scope="module")
    def proxy_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyCluster]:
        cluster = start_proxy_cluster(tmp_path_factory.mktemp(name), afslet_hosts, spare_hosts=spare_hosts,
                                      **afslet_options)
        try:
            yield cluster
        finally:
            cluster.stop()

    return proxy_cluster


@pytest.fixture(scope="module")
def afslet_cluster(proxy_cluster: ProxyCluster) -> AfsletCluster:
    """For the afslet support's `nothing_left_behind`: every afslet idle and the node clean after each test."""
    return proxy_cluster.base


@pytest.fixture
def proxies_idle(proxy_cluster: ProxyCluster) -> Iterator[None]:
    """After each test: no running proxy has a call in flight (waiting or relaying)."""
    yield
    for proxy in proxy_cluster.proxies:
        if proxy.running():
            wait_until_idle(proxy)


def wait_until_idle(proxy: Daemon) -> None:
    """Until the proxy has no call in flight (and so has counted every call in its metrics)."""
    wait_for(lambda: proxy_status(proxy, include_cluster=False)["local_dispatching"] == 0,
             f"{proxy.name} to have no call in flight")


# -- talking to a proxy -------------------------------------------------------------------------------


class ProxySdkCall(SdkCall):
    """One sdk_proxy_client.py process: the afslet support's SdkCall, running the proxy's script."""

    def __init__(self, request: dict, prefix: list[str] = ()) -> None:
        super().__init__(request, script=SDK_PROXY_CLIENT, prefix=prefix)


def execute_call(proxy: Daemon, **fields: object) -> ProxySdkCall:
    """One Execute through the proxy with AfsClient.execute (watch it, or kill the client)."""
    return ProxySdkCall({"address": proxy.address, "op": "execute", "input": fields, "extra_entries": []})


def execute(proxy: Daemon, *, extra_entries: list[dict] = (), **fields: object) -> CallResult:
    return ProxySdkCall({"address": proxy.address, "op": "execute", "input": fields,
                         "extra_entries": list(extra_entries)}).finish()


def execute_many(proxy: Daemon, count: int, **fields: object) -> list[dict]:
    """`count` Executes at once through one client connection; their "call" summaries."""
    return ProxySdkCall({"address": proxy.address, "op": "concurrent", "count": count,
                         "input": fields}).finish().of("call")


def sdk_proxy_status(proxy: Daemon) -> list[dict]:
    """The AfsProxy.Status stream, as afs-sdk's `status()` yields it."""
    return ProxySdkCall({"address": proxy.address, "op": "proxy_status"}).finish().events


def sdk_reconcile(proxy: Daemon, **fields: object) -> dict:
    (result,) = ProxySdkCall({"address": proxy.address, "op": "reconcile", "input": fields}).finish().events
    return result


def sdk_runtime_status(proxy: Daemon) -> dict:
    (status,) = ProxySdkCall({"address": proxy.address, "op": "status"}).finish().events
    return status


def afslet_of(proxy_lines: list[str]) -> str:
    """The afslet address in the proxy's "dispatched to afslet HOST:PORT by proxy ..." log line."""
    (line,) = [line for line in proxy_lines if line.startswith("dispatched to afslet ")]
    return line.split()[3]


def afslet_host(proxy_lines: list[str]) -> str:
    return afslet_of(proxy_lines).rsplit(":", 1)[0]


def proxy_status(proxy: Daemon, *, include_cluster: bool | None = None) -> dict:
    """GET /status of a proxy (without the parameter when `include_cluster` is None)."""
    query = "" if include_cluster is None else f"?include_cluster={'true' if include_cluster else 'false'}"
    with urllib.request.urlopen(f"http://{http_address(proxy)}/status{query}", timeout=30) as response:
        assert response.headers["Content-Type"] == "application/json"
        return json.loads(response.read())


def proxy_metrics(proxy: Daemon) -> str:
    return scrape(http_address(proxy))


afslet_metrics = daemon_metrics   # the name the proxy tests know it by


def wait_for(predicate: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.1)
