"""Where an Execute call may go, and where it goes: feasibility, then the proxy's scheduling strategy.

An afslet is a candidate when it answered its status and is not draining (an afslet stopping refuses new
calls). It is feasible for a request when the request fits both its limits (what it could ever admit)
and what it has available now (limits minus the shares of the calls it runs), less what this proxy is
handing it at this moment (handshakes in flight, not yet in its ledger) — for CPU cores, memory and GPU
slots (an opaque count: admission and accounting only).

Among the feasible afslets, `--strategy` picks one (`place`):

- `p2c` (default), the power of two choices: two drawn at random, the less loaded wins. Nearly as even
  as always picking the least loaded, but proxies acting on the same slightly stale statuses do not all
  pile onto the same afslet.
- `best-fit`: the afslet with the least room left after placing the call (`leftover`), so calls pack
  onto the fullest afslet that still fits them and whole afslets stay free for big requests (and for
  being drained or scaled away). Ties are broken at random.
- `local-first`: the preferred afslets (`--prefer`) while one of them is feasible, by the power of two
  choices among them; the others, the same way, only when none of them is.

Everything here is pure: statuses in, a choice out (randomness comes from the caller's `rng`).
"""

from __future__ import annotations

import contextlib
import enum
import math
import random
from collections.abc import Iterator
from dataclasses import dataclass

from afsd.api import afslet_pb2 as pb
from afsd.proxy.backends import BackendStatus


class Strategy(enum.StrEnum):
    """How the proxy picks among the feasible afslets (`afsd proxy --strategy`)."""

    P2C = "p2c"
    BEST_FIT = "best-fit"
    LOCAL_FIRST = "local-first"


@dataclass(frozen=True)
class Demand:
    """What one Execute call asks for (whole cores, megabytes, GPU slots)."""

    cpu_cores: int
    memory_mb: int
    gpus: int = 0

    @classmethod
    def of(cls, start: pb.StartRequest) -> Demand:
        return cls(start.cpu_cores, start.memory_mb, start.gpus)

    def __add__(self, other: Demand) -> Demand:
        return Demand(self.cpu_cores + other.cpu_cores, self.memory_mb + other.memory_mb, self.gpus + other.gpus)

    def __sub__(self, other: Demand) -> Demand:
        return Demand(self.cpu_cores - other.cpu_cores, self.memory_mb - other.memory_mb, self.gpus - other.gpus)

    def describe(self, with_gpus: bool = False) -> str:
        """`cpu_cores=1 memory_mb=256`, with ` gpus=N` when there are some or `with_gpus`."""
        text = f"cpu_cores={self.cpu_cores} memory_mb={self.memory_mb}"
        return f"{text} gpus={self.gpus}" if self.gpus or with_gpus else text

    def __str__(self) -> str:
        return self.describe()


NOTHING = Demand(0, 0, 0)


@dataclass(frozen=True)
class Candidate:
    address: str
    limits: Demand
    used: Demand

    @property
    def available(self) -> Demand:
        return Demand(max(0, self.limits.cpu_cores - self.used.cpu_cores),
                      max(0, self.limits.memory_mb - self.used.memory_mb), max(0, self.limits.gpus - self.used.gpus))

    def could_ever_fit(self, demand: Demand) -> bool:
        return _within(demand, self.limits)

    def fits_now(self, demand: Demand) -> bool:
        return _within(demand, self.available)

    @property
    def load(self) -> float:
        """The fullest resource, as a fraction of its limit (an afslet without CPU/memory limits: infinite)."""
        if self.limits.cpu_cores <= 0 or self.limits.memory_mb <= 0:
            return math.inf
        fractions = [self.used.cpu_cores / self.limits.cpu_cores, self.used.memory_mb / self.limits.memory_mb]
        if self.limits.gpus > 0:
            fractions.append(self.used.gpus / self.limits.gpus)
        return max(fractions)


def _within(demand: Demand, room: Demand) -> bool:
    return demand.cpu_cores <= room.cpu_cores and demand.memory_mb <= room.memory_mb and demand.gpus <= room.gpus


def leftover(candidate: Candidate, demand: Demand) -> float:
    """Best-fit's score: the room an afslet would have left after taking `demand`, as the sum over its
    resources of (available − demanded) / limit — CPU cores, memory, and GPU slots if it has any.

    0 is an afslet the call fills exactly; an idle afslet without GPUs scores about 2. Each resource counts
    as a fraction of its own limit, so cores and megabytes weigh the same. An afslet's free GPU slots add
    to its score, which keeps calls that need no GPU on afslets without GPUs while those have room.
    """
    room, limits = candidate.available - demand, candidate.limits
    return sum(free / limit for free, limit in ((room.cpu_cores, limits.cpu_cores), (room.memory_mb, limits.memory_mb),
                                                 (room.gpus, limits.gpus)) if limit > 0)


class PendingShares:
    """Shares this proxy is handing to afslets right now (between choosing one and its `accepted`)."""

    def __init__(self) -> None:
        self._shares: dict[str, Demand] = {}

    @contextlib.contextmanager
    def hold(self, address: str, demand: Demand) -> Iterator[None]:
        self._shares[address] = self.of(address) + demand
        try:
            yield
        finally:
            left = self._shares[address] - demand
            if left == NOTHING:
                del self._shares[address]
            else:
                self._shares[address] = left

    def of(self, address: str) -> Demand:
        return self._shares.get(address, NOTHING)


def candidates(statuses: list[BackendStatus], pending: PendingShares) -> list[Candidate]:
    """The afslets that answered and accept calls, their use raised by what this proxy is handing them."""
    found = []
    for backend in statuses:
        status = backend.status
        if status is None or status.draining:
            continue
        limits = Demand(status.limit_cpu_cores, status.limit_memory_mb, status.limit_gpus)
        used = Demand(status.used_cpu_cores, status.used_memory_mb, status.used_gpus)
        found.append(Candidate(backend.address, limits, used + pending.of(backend.address)))
    return found


def too_big_for_all(demand: Demand, accepting: list[Candidate]) -> bool:
    """True when afslets answered and none of them could ever admit `demand`: waiting cannot help."""
    return bool(accepting) and not any(c.could_ever_fit(demand) for c in accepting)


def feasible(demand: Demand, accepting: list[Candidate]) -> list[Candidate]:
    return [c for c in accepting if c.could_ever_fit(demand) and c.fits_now(demand)]


def power_of_two_choices(options: list[Candidate], rng: random.Random) -> Candidate:
    """The less loaded of two drawn at random (the first drawn on a tie)."""
    if not options:
        raise ValueError("no candidate to choose from")
    if len(options) == 1:
        return options[0]
    first, second = rng.sample(options, 2)
    return second if second.load < first.load else first


def best_fit(demand: Demand, options: list[Candidate], rng: random.Random) -> Candidate:
    """The feasible afslet with the smallest `leftover` after taking `demand` (a random one of the tied)."""
    if not options:
        raise ValueError("no candidate to choose from")
    scores = [leftover(option, demand) for option in options]
    best = min(scores)
    return rng.choice([option for option, score in zip(options, scores) if math.isclose(score, best)])


@dataclass(frozen=True)
class Choice:
    """Where a call goes, and why in a few words (for the proxy's log line to the client)."""

    candidate: Candidate
    reason: str


def place(strategy: Strategy, demand: Demand, options: list[Candidate], rng: random.Random,
          preferred: frozenset[str] = frozenset()) -> Choice:
    """Pick one of the feasible `options` for `demand` by `strategy`; `preferred` are the addresses
    local-first favours (ignored by the others)."""
    if strategy is Strategy.BEST_FIT:
        return Choice(best_fit(demand, options, rng), "best-fit")
    if strategy is Strategy.LOCAL_FIRST:
        local = [option for option in options if option.address in preferred]
        if local:
            return Choice(power_of_two_choices(local, rng), "local-first: preferred")
        return Choice(power_of_two_choices(options, rng), "local-first: no preferred afslet has room")
    return Choice(power_of_two_choices(options, rng), "p2c")
