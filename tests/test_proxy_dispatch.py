"""`afsd proxy` places Execute calls on afslets found by DNS and relays them, driven with the published
afs-sdk client as users do. Three afslets (127.0.0.2-4, one port, room for two 1-core calls each) behind
`afslets.afsd.test`, served by a real dnsmasq; the proxy resolves that name again at every attempt."""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Self

import grpc
import pytest

from afsd.api import afslet_pb2, afslet_pb2_grpc
from afsd.lab.catalogue import seeded_bytes
from afsd.lab.daemons import Daemon
from tests.support.afslet import direct_execute, file_entry, sdk_raw
from tests.support.proxy import (  # noqa: F401 - fixtures
    ProxyCluster,
    afslet_cluster,
    afslet_host,
    afslet_metrics,
    afslet_of,
    execute,
    execute_call,
    execute_many,
    metric,
    module_proxy_cluster,
    proxies_idle,
    proxy_metrics,
    proxy_status,
    sdk_runtime_status,
    wait_for,
    wait_until_idle,
)

HOSTS = ["127.0.0.2", "127.0.0.3", "127.0.0.4"]
proxy_cluster = module_proxy_cluster("proxy-dispatch", HOSTS, limit_cpu=2, limit_memory_mb=1024)
pytestmark = pytest.mark.usefixtures("nothing_left_behind", "proxies_idle")

ONE_CORE = {"cpu_cores": 1, "memory_mb": 256, "timeout_ms": 60_000}


@pytest.fixture(scope="module")
def proxy(proxy_cluster: ProxyCluster) -> Daemon:
    return proxy_cluster.start_proxy("proxy-main")


@pytest.fixture
def every_afslet_published(proxy_cluster: ProxyCluster, proxy: Daemon) -> Iterator[None]:
    """Tests that change DNS or kill afslets leave all three published, running and reached by the proxy."""
    yield
    for host in HOSTS:
        if not proxy_cluster.afslets[host].running():
            proxy_cluster.restart_afslet(host)
    proxy_cluster.publish_afslets(HOSTS)
    wait_for(lambda: sdk_runtime_status(proxy)["limit_cpu_cores"] == 2 * len(HOSTS), "the proxy to reach every afslet")


def test_an_execute_through_the_proxy_is_relayed_both_ways(proxy_cluster: ProxyCluster, proxy: Daemon) -> None:
    payload = seeded_bytes("relay", 3 << 20)  # several upload chunks and several tar chunks
    call = execute(proxy, image=proxy_cluster.base.images["tools"], **ONE_CORE,
                   extra_entries=[file_entry("in/data.bin", payload)],
                   command=["/bin/sh", "-c", "cp /in/data.bin /root/copy.bin && echo copied $(wc -c < /in/data.bin)"])
    assert call.result == {"event": "result", "success": True, "exit_code": 0, "error": ""}
    assert call.stdout == [f"copied {len(payload)}"]
    assert call.files()["root/copy.bin"] == payload
    assert call.kinds[:2] == ["accepted", "log"] and call.kinds[-1] == "done"
    assert afslet_host(call.lines("proxy")) in HOSTS


def test_a_large_writable_layer_streams_through_the_proxy_without_being_held_whole(
        proxy_cluster: ProxyCluster, proxy: Daemon) -> None:
    """~100 MB of incompressible output crosses the proxy frame by frame: its peak memory grows by a
    small fraction of that (flow control holds the afslet back while the client reads)."""
    assert proxy.process is not None
    before = _peak_rss_bytes(proxy.process.pid)
    size = 100_000_000
    call = direct_execute(proxy, image=proxy_cluster.base.images["tools"], cpu_cores=1, memory_mb=512,
                          timeout_ms=300_000,
                          command=["/bin/sh", "-c", f"head -c {size} /dev/urandom > /root/big.bin"]).finish()
    assert call.error is None and call.result.exit_code == 0, (call.error, call.responses[-3:])
    relayed = sum(len(chunk.data) for chunk in call.of("tar_chunk"))
    assert relayed > size                                     # gzip cannot shrink random bytes
    grown = _peak_rss_bytes(proxy.process.pid) - before
    print(f"relayed {relayed / 1e6:.0f} MB; the proxy's peak RSS grew by {grown / 1e6:.1f} MB")
    assert grown < relayed / 4, grown


def _peak_rss_bytes(pid: int) -> int:
    """VmHWM: the process's peak resident set so far."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmHWM for pid {pid}")


@pytest.mark.usefixtures("every_afslet_published")
def test_dns_changes_move_new_executions_without_a_proxy_restart(proxy_cluster: ProxyCluster, proxy: Daemon) -> None:
    tools = proxy_cluster.base.images["tools"]
    proxy_cluster.publish_afslets(["127.0.0.2"])
    calls = execute_many(proxy, 2, image=tools, command=["sleep", "0.2"], **ONE_CORE)
    assert [afslet_host(c["proxy"]) for c in calls] == ["127.0.0.2", "127.0.0.2"]

    proxy_cluster.publish_afslets(["127.0.0.3"])  # .2 removed, .3 added
    call = execute(proxy, image=tools, command=["true"], **ONE_CORE)
    assert afslet_host(call.lines("proxy")) == "127.0.0.3"

    proxy_cluster.publish_afslets(["127.0.0.2", "127.0.0.4"])
    # Four at once with room for two on each: both published afslets must be used, and no other.
    calls = execute_many(proxy, 4, image=tools, command=["sleep", "1"], **ONE_CORE)
    assert all(c["exit_code"] == 0 for c in calls), calls
    assert collections.Counter(afslet_host(c["proxy"]) for c in calls) == {"127.0.0.2": 2, "127.0.0.4": 2}


class StatusSampler:
    """Polls every afslet's GetRuntimeStatus and the proxy's /status while a test runs calls."""

    def __init__(self, proxy_cluster: ProxyCluster, proxy: Daemon) -> None:
        self.cluster, self.proxy = proxy_cluster, proxy
        self.most_used_cpu: dict[str, int] = collections.defaultdict(int)
        self.most_running: dict[str, int] = collections.defaultdict(int)
        self.most_waiting = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for host, afslet in self.cluster.afslets.items():
                status = self.cluster.base.runtime_status(afslet)
                self.most_used_cpu[host] = max(self.most_used_cpu[host], status.used_cpu_cores)
                self.most_running[host] = max(self.most_running[host], status.running_containers)
            self.most_waiting = max(self.most_waiting, proxy_status(self.proxy, include_cluster=False)["local_waiting"])
            self._stop.wait(0.05)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def test_twenty_concurrent_executions_spread_over_three_afslets(proxy_cluster: ProxyCluster, proxy: Daemon) -> None:
    afslets = proxy_cluster.afslets
    before = {host: afslet_metrics(afslet) for host, afslet in afslets.items()}
    proxy_before = proxy_metrics(proxy)
    with StatusSampler(proxy_cluster, proxy) as sampler:
        calls = execute_many(proxy, 20, image=proxy_cluster.base.images["tools"], command=["sleep", "1"], **ONE_CORE)
    wait_until_idle(proxy)  # the last calls' accounting may finish just after their clients hung up
    after = {host: afslet_metrics(afslet) for host, afslet in afslets.items()}
    proxy_after = proxy_metrics(proxy)

    assert len(calls) == 20 and all(c["exit_code"] == 0 for c in calls), calls
    placed = collections.Counter(afslet_host(c["proxy"]) for c in calls)
    assert set(placed) == set(HOSTS), placed  # every afslet took some
    for host in HOSTS:
        # The afslets ran exactly what the proxy says it placed there...
        ran = metric(after[host], "afsd_let_executions_total", outcome="ok") - \
            metric(before[host], "afsd_let_executions_total", outcome="ok")
        assert ran == placed[host], host
        # ... and never more at once than their room (2 one-core calls).
        assert sampler.most_used_cpu[host] <= 2 and sampler.most_running[host] <= 2, host

    def grew(name: str, **labels: str) -> float:
        return metric(proxy_after, name, **labels) - metric(proxy_before, name, **labels)

    # Twenty calls, six places: most had to wait and retry, and the proxy's metrics say so.
    attempts = [int(afslet_of_line.split("(attempt ")[1].split(",")[0]) for c in calls for afslet_of_line in c["proxy"]]
    assert grew("afsd_proxy_dispatch_retries_total") == sum(a - 1 for a in attempts) > 0
    assert sampler.most_waiting > 0
    assert grew("afsd_proxy_dispatches_total", outcome="ok") == 20
    for host in HOSTS:
        assert grew("afsd_proxy_backend_chosen_total", backend=f"{host}:{proxy_cluster.afslet_port}") == placed[host]
    # An afslet's RESOURCE_EXHAUSTED answers are the proxy's "refused" retries (it may have none).
    rejected = sum(metric(after[h], "afsd_let_admission_rejections_total") -
                   metric(before[h], "afsd_let_admission_rejections_total") for h in HOSTS)
    assert grew("afsd_proxy_dispatch_retries_total", reason="refused") == rejected
    assert metric(proxy_after, "afsd_proxy_dispatch_queue_length") == 0


@pytest.mark.usefixtures("every_afslet_published")
def test_an_afslet_killed_between_dispatches_is_skipped(proxy_cluster: ProxyCluster, proxy: Daemon) -> None:
    tools = proxy_cluster.base.images["tools"]
    proxy_cluster.afslets["127.0.0.3"].kill()  # still in DNS
    calls = execute_many(proxy, 4, image=tools, command=["sleep", "0.5"], **ONE_CORE)
    assert all(c["exit_code"] == 0 for c in calls), calls
    assert {afslet_host(c["proxy"]) for c in calls} <= {"127.0.0.2", "127.0.0.4"}

    proxy_cluster.restart_afslet("127.0.0.3")  # back on the same address: used again, no proxy restart
    wait_for(lambda: sdk_runtime_status(proxy)["limit_cpu_cores"] == 6, "the proxy to reach all three afslets")
    calls = execute_many(proxy, 6, image=tools, command=["sleep", "1"], **ONE_CORE)
    assert collections.Counter(afslet_host(c["proxy"]) for c in calls) == {h: 2 for h in HOSTS}


@pytest.mark.usefixtures("every_afslet_published")
def test_an_afslet_killed_mid_command_fails_that_execution_and_later_ones_go_elsewhere(
        proxy_cluster: ProxyCluster, proxy: Daemon) -> None:
    tools = proxy_cluster.base.images["tools"]
    call = execute_call(proxy, image=tools, **{**ONE_CORE, "timeout_ms": 600_000},
                        command=["/bin/sh", "-c", "echo started; sleep 600"])
    call.wait_for(lambda e: e.get("message") == "started")
    victim = afslet_of([e["message"] for e in call.events if e.get("source") == "proxy"])
    host = victim.rsplit(":", 1)[0]
    proxy_cluster.afslets[host].kill()

    result = call.finish(timeout=60)  # promptly: no waiting for the command's own timeout
    assert result.error is not None and result.error["status"] == "UNAVAILABLE", result.events[-3:]
    assert f"afslet {victim} failed during the execution" in result.error["message"]
    assert result.of("result") == []

    calls = execute_many(proxy, 3, image=tools, command=["true"], **ONE_CORE)
    assert all(c["exit_code"] == 0 for c in calls), calls
    assert host not in {afslet_host(c["proxy"]) for c in calls}
    assert "failed during the execution" in proxy.log()
    proxy_cluster.restart_afslet(host)  # its successor removes the orphaned container and mount


def test_a_request_bigger_than_every_afslet_is_rejected_at_once(proxy_cluster: ProxyCluster, proxy: Daemon) -> None:
    tools = proxy_cluster.base.images["tools"]
    wait_until_idle(proxy)
    before = proxy_metrics(proxy)
    for too_big in ({"cpu_cores": 3, "memory_mb": 256}, {"cpu_cores": 1, "memory_mb": 4096}):
        call = execute(proxy, image=tools, command=["true"], timeout_ms=10_000, **too_big)
        assert call.error is not None and call.error["status"] == "INVALID_ARGUMENT", call.events
        assert "bigger than every afslet's limits" in call.error["message"]
        assert f"cpu_cores={too_big['cpu_cores']} memory_mb={too_big['memory_mb']}" in call.error["message"]
    wait_until_idle(proxy)
    after = proxy_metrics(proxy)
    assert metric(after, "afsd_proxy_dispatch_retries_total") == metric(before, "afsd_proxy_dispatch_retries_total")
    assert metric(after, "afsd_proxy_dispatches_total", outcome="too_big") - \
        metric(before, "afsd_proxy_dispatches_total", outcome="too_big") == 2


@pytest.mark.usefixtures("every_afslet_published")
def test_retries_stop_at_the_servers_default_when_the_request_says_zero(proxy_cluster: ProxyCluster) -> None:
    impatient = proxy_cluster.start_proxy("proxy-impatient", extra_args=[
        "--dispatch-max-retries", "2", "--dispatch-backoff-ms", "10", "--dispatch-max-backoff-ms", "40"])
    tools = proxy_cluster.base.images["tools"]
    proxy_cluster.publish_afslets(["127.0.0.2"])
    holders = [execute_call(impatient, image=tools, **{**ONE_CORE, "timeout_ms": 600_000},
                            command=["/bin/sh", "-c", "echo started; sleep 600"]) for _ in range(2)]
    try:
        for holder in holders:
            holder.wait_for(lambda e: e.get("message") == "started")
        # afs-sdk sends proxy_dispatch_max_retries=0 unless told otherwise: the server's 2, not forever.
        for asked, attempts in ((0, 3), (1, 2)):
            call = execute(impatient, image=tools, command=["true"], proxy_dispatch_max_retries=asked,
                           proxy_dispatch_backoff_ms=10, **ONE_CORE)
            assert call.error is not None and call.error["status"] == "UNAVAILABLE", call.events
            assert f"no afslet accepted the request (cpu_cores=1 memory_mb=256) after {attempts} attempts" \
                in call.error["message"]
            assert "no afslet has room" in call.error["message"]
    finally:
        for holder in holders:
            holder.kill()  # the client goes away: the proxy cancels the afslet's call
    impatient.stop()


def test_a_client_that_goes_away_cancels_the_call_on_the_afslet(proxy_cluster: ProxyCluster, proxy: Daemon) -> None:
    call = execute_call(proxy, image=proxy_cluster.base.images["tools"], **{**ONE_CORE, "timeout_ms": 600_000},
                        command=["/bin/sh", "-c", "echo started; sleep 600"])
    call.wait_for(lambda e: e.get("message") == "started")
    host = afslet_host([e["message"] for e in call.events if e.get("source") == "proxy"])
    afslet = proxy_cluster.afslets[host]
    before = afslet_metrics(afslet)
    assert proxy_status(proxy)["local_relaying"] == 1
    call.kill()
    proxy_cluster.base.wait_idle(afslet)  # the container was stopped and removed long before its 600 s
    cancelled = metric(afslet_metrics(afslet), "afsd_let_executions_total", outcome="cancelled")
    assert cancelled - metric(before, "afsd_let_executions_total", outcome="cancelled") == 1


def test_a_client_that_stops_reading_then_goes_away_stops_the_command_at_once(
        proxy_cluster: ProxyCluster, proxy: Daemon) -> None:
    """The command floods output; the client reads none of it, so the proxy and the afslet are both
    blocked handing messages on when the client goes away. That must still cancel the afslet's call at
    once (gRPC never closes a generator handler blocked in a write: grpc/grpc#42295)."""
    start = afslet_pb2.StartRequest(image=proxy_cluster.base.images["tools"], cpu_cores=1, memory_mb=64,
                                    timeout_ms=600_000, command=["yes", "a line of output nobody reads"])
    with grpc.insecure_channel(proxy.address) as channel:
        call = afslet_pb2_grpc.AfsletStub(channel).Execute(iter([afslet_pb2.ExecuteRequest(start=start)]))
        afslets = list(proxy_cluster.afslets.values())

        def running() -> int:
            return sum(proxy_cluster.base.runtime_status(afslet).running_containers for afslet in afslets)
        deadline = time.monotonic() + 60
        while running() == 0:
            assert time.monotonic() < deadline, "the command never started"
            time.sleep(0.1)
        time.sleep(2)        # every buffer between `yes` and this client fills up
        call.cancel()
    for afslet in afslets:
        proxy_cluster.base.wait_idle(afslet, timeout=30)   # stopped long before its 600 s


def test_the_afslets_own_refusals_reach_the_client_unretried(proxy_cluster: ProxyCluster, proxy: Daemon) -> None:
    start = {"image": proxy_cluster.base.images["tools"], "command": ["true"], "cpu_cores": 1, "memory_mb": 256,
             "timeout_ms": 10_000}
    not_start = sdk_raw(proxy, [{"file_end": {}}, {"start": start}])
    assert not_start.error == {"event": "error", "status": "INVALID_ARGUMENT",
                               "message": "first request must be start, got file_end"}
    bad_env = sdk_raw(proxy, [{"start": {**start, "env": ["NO_EQUALS_SIGN"]}}])  # checked by the afslet
    assert bad_env.error is not None and bad_env.error["status"] == "INVALID_ARGUMENT"
    assert "NO_EQUALS_SIGN" in bad_env.error["message"] and "is not KEY=VALUE" in bad_env.error["message"]
    negative = sdk_raw(proxy, [{"start": {**start, "proxy_dispatch_max_retries": -1}}])
    assert negative.error is not None and negative.error["status"] == "INVALID_ARGUMENT"


def test_get_runtime_status_sums_the_afslets(proxy_cluster: ProxyCluster, proxy: Daemon) -> None:
    assert sdk_runtime_status(proxy) == {
        "event": "status", "running_containers": 0, "limit_cpu_cores": 6, "limit_memory_mb": 3072,
        "used_cpu_cores": 0, "used_memory_mb": 0, "available_cpu_cores": 6, "available_memory_mb": 3072}


def test_sigterm_gives_running_calls_the_grace_then_cancels_them(proxy_cluster: ProxyCluster) -> None:
    stopping = proxy_cluster.start_proxy("proxy-stopping", extra_args=["--graceful-timeout", "1"])
    call = execute_call(stopping, image=proxy_cluster.base.images["tools"], **{**ONE_CORE, "timeout_ms": 600_000},
                        command=["/bin/sh", "-c", "echo started; sleep 600"])
    call.wait_for(lambda e: e.get("message") == "started")
    assert stopping.stop() == 0
    result = call.finish(timeout=60)
    assert result.error is not None and result.of("result") == []
    # The afslet's call was cancelled with it: nothing_left_behind checks that it is idle and clean.
