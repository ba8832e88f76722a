"""The proxy's decisions in isolation: which afslets can take a call, the power of two choices, the
retry bound and backoff, and the reconcile plan that spreads layer copies over layerstores; and its
command line refusing what cannot work."""

from __future__ import annotations

import asyncio
import collections
import random
import subprocess
import sys

import pytest

from afsd.api import afslet_pb2 as pb
from afsd.api import discovery_pb2 as dpb
from afsd.proxy.backends import BackendStatus, total
from afsd.proxy.placement import Demand, PendingShares, candidates, choose, feasible, too_big_for_all
from afsd.proxy.reconcile_plan import current_replica, plan
from afsd.proxy.retry import RetryDefaults, RetryPolicy, Waiters

ONE_CORE = Demand(1, 256)


def afslet(address: str, *, cpu: int = 2, memory: int = 1024, used_cpu: int = 0, used_memory: int = 0,
           gpus: int = 0, used_gpus: int = 0, draining: bool = False) -> BackendStatus:
    return BackendStatus(address, pb.GetRuntimeStatusResponse(
        limit_cpu_cores=cpu, limit_memory_mb=memory, used_cpu_cores=used_cpu, used_memory_mb=used_memory,
        available_cpu_cores=cpu - used_cpu, available_memory_mb=memory - used_memory, limit_gpus=gpus,
        used_gpus=used_gpus, available_gpus=gpus - used_gpus, draining=draining))


def test_only_afslets_that_answered_take_calls_and_have_room_are_feasible() -> None:
    statuses = [afslet("a", used_cpu=2), afslet("b", used_cpu=1), BackendStatus("c", None, "UNAVAILABLE: down"),
                afslet("d", draining=True), afslet("e", cpu=8, memory=128)]
    accepting = candidates(statuses, PendingShares())
    assert [c.address for c in accepting] == ["a", "b", "e"]
    assert [c.address for c in feasible(ONE_CORE, accepting)] == ["b"]


def test_shares_being_handed_out_count_as_used() -> None:
    pending = PendingShares()
    statuses = [afslet("a", used_cpu=1)]
    with pending.hold("a", ONE_CORE):
        assert feasible(ONE_CORE, candidates(statuses, pending)) == []
    assert [c.address for c in feasible(ONE_CORE, candidates(statuses, pending))] == ["a"]


def test_too_big_means_no_afslet_could_ever_admit_it() -> None:
    accepting = candidates([afslet("a", cpu=2, memory=4096), afslet("b", cpu=8, memory=512)], PendingShares())
    assert too_big_for_all(Demand(4, 1024), accepting)           # each resource fits somewhere, never both
    assert not too_big_for_all(Demand(2, 4096), accepting)
    assert too_big_for_all(Demand(1, 256, gpus=1), accepting)    # no afslet has GPU slots
    assert not too_big_for_all(ONE_CORE, [])                     # nobody answered: not a verdict


def test_power_of_two_choices_prefers_the_less_loaded_and_spreads() -> None:
    rng = random.Random(7)
    statuses = [afslet("idle"), afslet("half", used_cpu=1, used_memory=512), afslet("busy", cpu=4, used_cpu=3)]
    picks = collections.Counter(choose(candidates(statuses, PendingShares()), rng).address for _ in range(3000))
    assert picks["idle"] > picks["half"] > picks["busy"] == 0  # "busy" can only win a draw against itself
    assert choose(candidates([afslet("only")], PendingShares()), rng).address == "only"


def test_gpu_use_counts_in_the_load() -> None:
    (a,) = candidates([afslet("a", gpus=4, used_gpus=3, used_cpu=1)], PendingShares())
    assert a.load == 0.75


def test_zero_retries_in_a_request_means_the_servers_default_and_the_wait_is_bounded() -> None:
    defaults = RetryDefaults(max_retries=20, backoff_ms=50, max_backoff_ms=2000)
    policy = RetryPolicy.for_request(pb.StartRequest(proxy_dispatch_max_retries=0, proxy_dispatch_backoff_ms=0),
                                     defaults)
    assert (policy.max_retries, policy.backoff_ms) == (20, 50)
    assert policy.worst_case_wait() == (50 + 100 + 200 + 400 + 800 + 1600 + 14 * 2000) / 1000
    own = RetryPolicy.for_request(pb.StartRequest(proxy_dispatch_max_retries=3, proxy_dispatch_backoff_ms=10),
                                  defaults)
    assert (own.max_retries, own.backoff_ms) == (3, 10)


def test_backoff_doubles_with_jitter_up_to_the_cap() -> None:
    policy = RetryPolicy(max_retries=10, backoff_ms=50, max_backoff_ms=400)
    rng = random.Random(1)
    for retry, ceiling in ((1, 0.05), (2, 0.1), (3, 0.2), (4, 0.4), (9, 0.4)):
        delays = [policy.delay(retry, rng) for _ in range(200)]
        assert ceiling / 2 <= min(delays) and max(delays) <= ceiling
        assert max(delays) - min(delays) > ceiling / 4  # jittered, not lockstep


async def test_the_oldest_waiter_is_woken_first() -> None:
    waiters, woken = Waiters(), []

    async def wait(name: str) -> None:
        await waiters.sleep(30)
        woken.append(name)

    tasks = [asyncio.create_task(wait(name)) for name in ("first", "second")]
    await asyncio.sleep(0.01)
    waiters.wake_oldest()
    await asyncio.sleep(0.01)
    assert woken == ["first"]
    waiters.wake_oldest()
    await asyncio.gather(*tasks)
    assert woken == ["first", "second"]


def test_the_proxys_runtime_status_is_the_sum_of_the_afslets() -> None:
    summed = total([afslet("a", used_cpu=1), afslet("b", cpu=4, gpus=2), BackendStatus("c", None, "down")])
    assert (summed.limit_cpu_cores, summed.used_cpu_cores, summed.available_cpu_cores) == (6, 1, 5)
    assert (summed.limit_memory_mb, summed.limit_gpus, summed.draining) == (2048, 2, False)


def layer(digest: str, size: int) -> dpb.ImageLayer:
    return dpb.ImageLayer(digest=digest, compressed_size=size)


def store(name: str, holds: list[str] = (), cache_max: int = 0) -> dpb.ServiceInstance:
    return dpb.ServiceInstance(node_id=name, endpoint=f"{name}:1",
                               layer_stats=[dpb.LayerStat(digest=d, afs_size=100) for d in holds],
                               cache_max_bytes=cache_max)


def test_the_plan_spreads_missing_copies_over_distinct_layerstores() -> None:
    layers = [layer("L1", 300), layer("L2", 200)]
    stores = [store("full", ["L1", "L2"]), store("other", ["L1", "L2"]), store("b"), store("c")]
    assert current_replica(layers, stores) == 2
    assert plan(layers, stores, 2) == {}
    # One more copy of each: two different nodes, neither of the two that hold everything.
    assignments = plan(layers, stores, 3)
    assert sorted((endpoint, [l.digest for l in wanted]) for endpoint, wanted in assignments.items()) == \
        [("b:1", ["L1"]), ("c:1", ["L2"])]


def test_the_plan_puts_one_layer_per_node_when_there_are_enough_nodes() -> None:
    layers = [layer(f"L{i}", 100 * i) for i in range(1, 7)]
    stores = [store("a", [l.digest for l in layers])] + [store(f"n{i}") for i in range(7)]
    assignments = plan(layers, stores, 2)
    assert sorted(len(wanted) for wanted in assignments.values()) == [1] * 6


def test_the_plan_avoids_layerstores_without_room_and_caps_at_what_exists() -> None:
    layers = [layer("L1", 500)]
    stores = [store("holder", ["L1"]), store("small", cache_max=300), store("roomy", cache_max=10_000)]
    assert list(plan(layers, stores, 2)) == ["roomy:1"]
    assert sorted(plan(layers, stores, 5)) == ["roomy:1", "small:1"]  # only two lack it


@pytest.mark.parametrize("flags, message", [
    (["--afslet-target", "no-port"], "--afslet-target: invalid endpoint 'no-port': expected HOST:PORT"),
    (["--afslet-target", "afslets:1", "--dispatch-max-retries", "-1"], "--dispatch-max-retries must be >= 0"),
    (["--afslet-target", "afslets:1", "--status-timeout", "0"], "must be > 0"),
])
def test_the_command_line_refuses_bad_flags_in_one_line(flags: list[str], message: str) -> None:
    result = subprocess.run([sys.executable, "-m", "afsd", "proxy", *flags], capture_output=True, text=True, check=False,
                            timeout=60)
    assert result.returncode == 2
    assert result.stderr.startswith("afsd proxy: error: ") and message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
