"""The proxy's decisions in isolation: which afslets can take a call (CPU, memory and GPU slots), where
each scheduling strategy puts it (power of two choices, best-fit, local-first), the retry bound and
backoff, and the reconcile plan that spreads layer copies over layerstores; and its command line
refusing what cannot work."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import random
import subprocess
import sys

import pytest

from afsd.api import afslet_pb2 as pb
from afsd.api import discovery_pb2 as dpb
from afsd.proxy.backends import BackendStatus, total
from afsd.proxy.placement import (
    Demand,
    PendingShares,
    Strategy,
    best_fit,
    candidates,
    feasible,
    leftover,
    place,
    power_of_two_choices,
    too_big_for_all,
)
from afsd.proxy.reconcile_plan import current_replica, plan
from afsd.proxy.retry import RetryDefaults, RetryPolicy, Waiters
from afsd.proxy.targets import resolve_preferred, with_default_port

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
    picks = collections.Counter(power_of_two_choices(candidates(statuses, PendingShares()), rng).address
                                for _ in range(3000))
    assert picks["idle"] > picks["half"] > picks["busy"] == 0  # "busy" can only win a draw against itself
    assert power_of_two_choices(candidates([afslet("only")], PendingShares()), rng).address == "only"


def test_gpu_use_counts_in_the_load() -> None:
    (a,) = candidates([afslet("a", gpus=4, used_gpus=3, used_cpu=1)], PendingShares())
    assert a.load == 0.75


def fill(strategy: Strategy, statuses: list[BackendStatus], calls: int, demand: Demand = ONE_CORE,
         preferred: frozenset[str] = frozenset(), seed: int = 3) -> list[str]:
    """Where `calls` calls go one after another, each one's share counted as used by the next."""
    rng, pending, placed = random.Random(seed), PendingShares(), []
    with contextlib.ExitStack() as held:
        for _ in range(calls):
            options = feasible(demand, candidates(statuses, pending))
            if not options:
                placed.append("-")
                continue
            address = place(strategy, demand, options, rng, preferred).candidate.address
            held.enter_context(pending.hold(address, demand))
            placed.append(address)
    return placed


def test_best_fit_fills_the_most_loaded_feasible_afslet_first() -> None:
    statuses = [afslet("a"), afslet("b", used_cpu=1, used_memory=256), afslet("c"), afslet("full", used_cpu=2)]
    for seed in range(20):
        placed = fill(Strategy.BEST_FIT, statuses, 6, seed=seed)
        # "b" first (the fullest that still fits), then a fresh one until it is full, then the last one.
        assert placed[0] == "b" and placed[1] == placed[2] != placed[3] == placed[4], placed
        assert {placed[1], placed[3]} == {"a", "c"} and placed[5] == "-"


def test_the_power_of_two_choices_spreads_where_best_fit_packs() -> None:
    statuses = [afslet("a"), afslet("b"), afslet("c")]
    for seed in range(20):
        spread = fill(Strategy.P2C, statuses, 2, seed=seed)
        packed = fill(Strategy.BEST_FIT, statuses, 2, seed=seed)
        assert spread[0] != spread[1] and packed[0] == packed[1], (spread, packed)


def test_best_fits_score_is_the_room_left_summed_over_resources_as_fractions_of_their_limits() -> None:
    (plain, gpu) = candidates([afslet("plain", cpu=4, memory=1000, used_cpu=1, used_memory=250),
                               afslet("gpu", cpu=4, memory=1000, gpus=2, used_gpus=1)], PendingShares())
    assert leftover(plain, Demand(1, 250)) == 2 / 4 + 500 / 1000
    assert leftover(gpu, Demand(1, 250, gpus=1)) == 3 / 4 + 750 / 1000 + 0 / 2
    # A free GPU slot is room too: a call that needs none goes where no GPU is left idle.
    assert best_fit(Demand(1, 250), [plain, gpu], random.Random(1)).address == "plain"
    assert leftover(gpu, Demand(1, 250)) == 3 / 4 + 750 / 1000 + 1 / 2


def test_best_fit_breaks_ties_at_random() -> None:
    tied = candidates([afslet("a"), afslet("b"), afslet("c")], PendingShares())
    rng = random.Random(5)
    assert {best_fit(ONE_CORE, tied, rng).address for _ in range(100)} == {"a", "b", "c"}


def test_local_first_uses_the_preferred_afslets_while_they_have_room_then_the_others() -> None:
    statuses = [afslet("a"), afslet("b"), afslet("local")]
    for seed in range(20):
        placed = fill(Strategy.LOCAL_FIRST, statuses, 4, preferred=frozenset({"local"}), seed=seed)
        assert placed[:2] == ["local", "local"] and set(placed[2:]) <= {"a", "b"}, placed
    options = candidates(statuses, PendingShares())
    assert place(Strategy.LOCAL_FIRST, ONE_CORE, options, random.Random(1), frozenset({"local"})).reason == \
        "local-first: preferred"
    fallback = place(Strategy.LOCAL_FIRST, ONE_CORE, options[:2], random.Random(1), frozenset({"local"}))
    assert fallback.reason == "local-first: no preferred afslet has room"
    # Several preferred: spread among them by the power of two choices, the others untouched.
    assert set(fill(Strategy.LOCAL_FIRST, statuses, 4, preferred=frozenset({"a", "local"}))) == {"a", "local"}


def test_gpu_requests_are_feasible_only_where_gpu_slots_are_free() -> None:
    statuses = [afslet("cpu-only", cpu=8, memory=8192), afslet("two", gpus=2, used_gpus=1),
                afslet("four", gpus=4, used_gpus=4)]
    accepting = candidates(statuses, PendingShares())
    assert [c.address for c in feasible(Demand(1, 256, gpus=1), accepting)] == ["two"]
    assert feasible(Demand(1, 256, gpus=2), accepting) == []           # must wait: "four" could take it later
    assert not too_big_for_all(Demand(1, 256, gpus=4), accepting)
    assert too_big_for_all(Demand(1, 256, gpus=5), accepting)          # never: waiting cannot help
    assert [c.address for c in feasible(Demand(1, 256), accepting)] == ["cpu-only", "two", "four"]
    pending = PendingShares()
    with pending.hold("two", Demand(1, 256, gpus=1)):                   # a GPU handshake in flight counts
        assert feasible(Demand(1, 256, gpus=1), candidates(statuses, pending)) == []


def test_messages_name_gpus_when_the_request_has_some() -> None:
    assert str(Demand(1, 256)) == "cpu_cores=1 memory_mb=256"
    assert str(Demand(1, 256, gpus=2)) == "cpu_cores=1 memory_mb=256 gpus=2"
    assert Demand(2, 1024).describe(with_gpus=True) == "cpu_cores=2 memory_mb=1024 gpus=0"


@pytest.mark.parametrize("value, target", [
    ("127.0.0.2", "127.0.0.2:61051"), ("local.example", "local.example:61051"), ("10.0.0.1:7000", "10.0.0.1:7000"),
    ("::1", "[::1]:61051"), ("[::1]", "[::1]:61051"), ("[fd00::2]:7000", "[fd00::2]:7000"),
])
def test_a_preferred_afslet_takes_the_afslet_targets_port_unless_it_names_one(value: str, target: str) -> None:
    assert with_default_port(value, 61051) == target


async def test_preferred_addresses_are_resolved_like_the_afslet_target() -> None:
    assert await resolve_preferred(("127.0.0.3:1", "[::1]:1", "127.0.0.3:1"), "afslets:1") == \
        frozenset({"127.0.0.3:1", "[::1]:1"})


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
    for retry, ceiling in ((1, 0.05), (2, 0.1), (3, 0.2), (4, 0.4), (9, 0.4), (5000, 0.4)):
        delays = [policy.delay(retry) for _ in range(200)]
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
    (["--afslet-target", "afslets:1", "--strategy", "worst-fit"],
     "--strategy must be one of p2c, best-fit, local-first (got 'worst-fit')"),
    (["--afslet-target", "afslets:1", "--strategy", "local-first"],
     "--strategy local-first needs the preferred afslets: --prefer HOST[:PORT]"),
    (["--afslet-target", "afslets:1", "--prefer", "127.0.0.2"], "--prefer applies to --strategy local-first only"),
    (["--afslet-target", "afslets:1", "--strategy", "local-first", "--prefer", "[::1"],
     "--prefer: invalid address '[::1': expected HOST, HOST:PORT or [IPv6]:PORT"),
])
def test_the_command_line_refuses_bad_flags_in_one_line(flags: list[str], message: str) -> None:
    result = subprocess.run([sys.executable, "-m", "afsd", "proxy", *flags], capture_output=True, text=True, check=False,
                            timeout=60)
    assert result.returncode == 2
    assert result.stderr.startswith("afsd proxy: error: ") and message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
