"""Where `afsd proxy` puts calls, by its `--strategy`: best-fit packs 1-core calls onto the most loaded
afslet that still fits them, the power of two choices (the default) spreads them, local-first keeps
them on the preferred afslets (named by a DNS name) while those have room; and GPU slots decide
feasibility, "too big" and the summed status through the proxy.

Three afslets (127.0.0.2-4, room for two 1-core calls each) behind `afslets.afsd.test`, and one with
two GPU slots (127.0.0.5) that `gpu-afslets.afsd.test` lists with 127.0.0.2; names served by a real
dnsmasq. Calls use afsd's own protos (afs-sdk cannot ask for GPUs); each holds its share until the
test cancels it.
"""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest

from afsd.lab.daemons import Daemon
from tests.support.afslet import DirectCall, direct_execute, sdk_execute
from tests.support.proxy import (  # noqa: F401 - fixtures
    ProxyCluster,
    afslet_cluster,
    afslet_host,
    module_proxy_cluster,
    proxies_idle,
)

HOSTS = ["127.0.0.2", "127.0.0.3", "127.0.0.4"]
GPU_HOST = "127.0.0.5"
GPU_AFSLETS = "gpu-afslets.afsd.test"
LOCAL = "local.afsd.test"
proxy_cluster = module_proxy_cluster("proxy-scheduling", HOSTS, spare_hosts=[GPU_HOST], limit_cpu=2,
                                     limit_memory_mb=1024)
pytestmark = pytest.mark.usefixtures("nothing_left_behind", "proxies_idle")

# Exits at the first stage of the staged abort when its call is cancelled.
HOLD = "trap 'exit 0' TERM; echo started; sleep 600 & wait"


def hold(target: Daemon, image: str, **fields: object) -> DirectCall:
    """A call that runs until cancelled, once its command has started (so its share is in the ledger)."""
    call = direct_execute(target, image=image, timeout_ms=600_000, command=["/bin/sh", "-c", HOLD],
                          **{"memory_mb": 256, **fields})
    call.wait_for_line("started")
    return call


def placed_on(call: DirectCall) -> str:
    """The afslet host the proxy's "dispatched to afslet ..." line names."""
    return afslet_host(call.lines("proxy"))


def reason(call: DirectCall) -> str:
    """Why the proxy chose that afslet: the last part of its line, "(attempt 1, 5 ms, best-fit)"."""
    (line,) = call.lines("proxy")
    return line.rsplit(", ", 1)[1].rstrip(")")


def release(cluster: ProxyCluster, calls: list[DirectCall]) -> None:
    """Cancel the calls (their clients go away) and wait until every afslet has finished their teardown."""
    for call in calls:
        call.cancel()
    calls.clear()
    for afslet in cluster.afslets.values():
        cluster.base.wait_idle(afslet)


@pytest.fixture
def calls() -> Iterator[list[DirectCall]]:
    """Calls a test holds; cancelled (the client goes away) when it ends."""
    held: list[DirectCall] = []
    yield held
    for call in held:
        call.cancel()


@pytest.fixture(scope="module")
def tools(proxy_cluster: ProxyCluster) -> str:
    return proxy_cluster.base.images["tools"]


@pytest.fixture(scope="module")
def p2c(proxy_cluster: ProxyCluster) -> Daemon:
    return proxy_cluster.start_proxy("proxy-p2c")


@pytest.fixture(scope="module")
def best_fit(proxy_cluster: ProxyCluster) -> Daemon:
    return proxy_cluster.start_proxy("proxy-best-fit", extra_args=["--strategy", "best-fit"])


def test_best_fit_fills_the_most_loaded_feasible_afslet_first(proxy_cluster: ProxyCluster, best_fit: Daemon,
                                                               tools: str, calls: list[DirectCall]) -> None:
    calls.append(hold(proxy_cluster.afslets["127.0.0.3"], tools, cpu_cores=1))  # straight to .3: the most loaded
    placed = []
    for _ in range(5):
        calls.append(hold(best_fit, tools, cpu_cores=1))
        placed.append(placed_on(calls[-1]))
    # .3's last core first; then one of the idle afslets until it is full; then the other one.
    assert placed[0] == "127.0.0.3"
    assert placed[1] == placed[2] != placed[3] == placed[4], placed
    assert {placed[1], placed[3]} == {"127.0.0.2", "127.0.0.4"}
    assert {reason(call) for call in calls[1:]} == {"best-fit"}


def test_the_power_of_two_choices_spreads_1_core_calls(proxy_cluster: ProxyCluster, p2c: Daemon, best_fit: Daemon,
                                                         tools: str, calls: list[DirectCall]) -> None:
    for proxy in (p2c, best_fit):
        calls += [hold(proxy, tools, cpu_cores=1) for _ in range(2)]
        first, second = (placed_on(call) for call in calls)
        if proxy is p2c:  # an idle afslet always beats a loaded one in a draw, so the second goes elsewhere
            assert first != second and reason(calls[0]) == "p2c"
        else:             # while best-fit puts it where the first went
            assert first == second
        release(proxy_cluster, calls)


def test_local_first_keeps_calls_on_the_preferred_afslets_while_they_have_room(
        proxy_cluster: ProxyCluster, tools: str, calls: list[DirectCall]) -> None:
    proxy_cluster.publish_afslets(["127.0.0.4"], name=LOCAL)
    local = proxy_cluster.start_proxy("proxy-local-first",
                                      extra_args=["--strategy", "local-first", "--prefer", LOCAL])
    for _ in range(4):
        calls.append(hold(local, tools, cpu_cores=1))
    assert [placed_on(call) for call in calls[:2]] == ["127.0.0.4", "127.0.0.4"]
    assert {placed_on(call) for call in calls[2:]} <= {"127.0.0.2", "127.0.0.3"}  # .4 is full: the others
    assert [reason(call) for call in calls] == ["local-first: preferred"] * 2 + \
        ["local-first: no preferred afslet has room"] * 2
    release(proxy_cluster, calls)

    proxy_cluster.publish_afslets(["127.0.0.2"], name=LOCAL)  # the preferred set is a DNS answer: no restart
    calls.append(hold(local, tools, cpu_cores=1))
    assert placed_on(calls[0]) == "127.0.0.2"
    proxy_cluster.publish_afslets([], name=LOCAL)  # a name that resolves to nothing prefers nothing
    fallback = sdk_execute(local, image=tools, command=["echo", "placed"], cpu_cores=1, memory_mb=128,
                           timeout_ms=10_000)
    assert fallback.stdout == ["placed"]
    assert fallback.lines("proxy")[0].endswith(", local-first: no preferred afslet has room)")


# -- GPU slots ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gpu_proxies(proxy_cluster: ProxyCluster) -> dict[str, Daemon]:
    """A p2c and a best-fit proxy over 127.0.0.2 (no GPUs) and 127.0.0.5 (2 GPU slots)."""
    proxy_cluster.start_afslets([GPU_HOST], extra_args=["--limit-gpus", "2"])
    proxy_cluster.publish_afslets(["127.0.0.2", GPU_HOST], name=GPU_AFSLETS)
    return {"p2c": proxy_cluster.start_proxy("proxy-gpus", afslets_name=GPU_AFSLETS),
            "best-fit": proxy_cluster.start_proxy("proxy-gpus-best-fit", afslets_name=GPU_AFSLETS,
                                                  extra_args=["--strategy", "best-fit"])}


def test_gpu_calls_go_only_where_gpu_slots_are_free(proxy_cluster: ProxyCluster, gpu_proxies: dict[str, Daemon],
                                                    tools: str, calls: list[DirectCall]) -> None:
    proxy = gpu_proxies["p2c"]
    status = proxy_cluster.base.runtime_status(proxy)  # the proxy's: summed over both afslets
    assert (status.limit_gpus, status.used_gpus, status.available_gpus, status.limit_cpu_cores) == (2, 0, 2, 4)

    for _ in range(2):
        calls.append(hold(proxy, tools, cpu_cores=1, memory_mb=64, gpus=1))
    assert [placed_on(call) for call in calls] == [GPU_HOST, GPU_HOST]
    status = proxy_cluster.base.runtime_status(proxy)
    assert (status.used_gpus, status.available_gpus, status.used_cpu_cores) == (2, 0, 2)

    # A third waits for a slot; with one retry allowed it gives up, saying where there was no room.
    waiting = direct_execute(proxy, image=tools, command=["true"], gpus=1, proxy_dispatch_max_retries=1,
                             proxy_dispatch_backoff_ms=10).finish()
    assert waiting.error is not None and waiting.error.code() == grpc.StatusCode.UNAVAILABLE
    port = proxy_cluster.afslet_port
    assert ("no afslet accepted the request (cpu_cores=1 memory_mb=64 gpus=1) after 2 attempts" in
            waiting.error.details())
    assert (f"no afslet has room for cpu_cores=1 memory_mb=64 gpus=1 now (available: 127.0.0.2:{port} cpu_cores=2 "
            f"memory_mb=1024 gpus=0, {GPU_HOST}:{port} cpu_cores=0 memory_mb=896 gpus=0)") in waiting.error.details()

    # A call that needs no GPU still runs, on the afslet with room.
    plain = direct_execute(proxy, image=tools, command=["echo", "no gpu"]).finish()
    assert plain.lines("runc:stdout") == ["no gpu"] and placed_on(plain) == "127.0.0.2"

    calls[0].cancel()  # a slot is free again: the next GPU call gets it
    again = direct_execute(proxy, image=tools, command=["echo", "gpu"], gpus=1).finish()
    assert again.lines("runc:stdout") == ["gpu"] and placed_on(again) == GPU_HOST


def test_more_gpus_than_any_afslet_has_is_refused_at_once(proxy_cluster: ProxyCluster,
                                                          gpu_proxies: dict[str, Daemon], tools: str) -> None:
    port = proxy_cluster.afslet_port
    too_many = direct_execute(gpu_proxies["p2c"], image=tools, command=["true"], gpus=3).finish()
    assert too_many.error is not None and too_many.error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert too_many.error.details() == (
        f"request cpu_cores=1 memory_mb=64 gpus=3 is bigger than every afslet's limits (127.0.0.2:{port} cpu_cores=2 "
        f"memory_mb=1024 gpus=0, {GPU_HOST}:{port} cpu_cores=2 memory_mb=1024 gpus=2); ask for less")
    negative = direct_execute(gpu_proxies["p2c"], image=tools, command=["true"], gpus=-1).finish()
    assert negative.error is not None and negative.error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert negative.error.details() == "start.gpus must be >= 0 (got -1)"
    assert too_many.of("accepted") == [] and negative.of("accepted") == []


def test_best_fit_keeps_calls_without_gpus_off_an_afslet_whose_gpus_are_idle(
        gpu_proxies: dict[str, Daemon], tools: str, calls: list[DirectCall]) -> None:
    proxy = gpu_proxies["best-fit"]
    for _ in range(2):
        calls.append(hold(proxy, tools, cpu_cores=1))
    assert [placed_on(call) for call in calls] == ["127.0.0.2", "127.0.0.2"]
    calls.append(hold(proxy, tools, cpu_cores=1))  # .2 is full: the GPU afslet takes it rather than wait
    assert placed_on(calls[-1]) == GPU_HOST
