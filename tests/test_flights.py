"""The fetcher's in-flight de-duplication and priority gate (afsd/cluster/flights.py), without a network:
the read function is a coroutine the test controls."""

from __future__ import annotations

import asyncio

import pytest

from afsd.cluster.flights import FlightTable, PriorityGate
from afsd.ondemand.spec import Priority

CHUNK = 100


class Reads:
    """A read function whose calls block until the test lets them go; it records every call."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, int]] = []
        self.release = asyncio.Event()

    async def __call__(self, start: int, end: int) -> tuple[int, int]:
        self.calls.append((start, end))
        await self.release.wait()
        return start, end


def table(reads: Reads, *, slots: int = 4, size: int = 10 * CHUNK,
          piece_chunks: int = 3) -> FlightTable[tuple[int, int]]:
    return FlightTable(size=size, chunk_size=CHUNK, piece_chunks=piece_chunks, gate=PriorityGate(slots), read=reads)


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_a_range_is_split_into_pieces_of_at_most_piece_chunks() -> None:
    reads = Reads()
    flights, shared = table(reads).cover(0, 7 * CHUNK, Priority.DEMAND)
    await settle()
    assert not shared
    assert [(f.start, f.end) for f in flights] == [(0, 300), (300, 600), (600, 700)]
    reads.release.set()
    assert await asyncio.gather(*(f.task for f in flights)) == [(0, 300), (300, 600), (600, 700)]


async def test_the_last_piece_ends_at_the_blobs_end() -> None:
    reads = Reads()
    reads.release.set()
    flights, _ = table(reads, size=950).cover(600, 1000, Priority.DEMAND)
    assert [await f.task for f in flights] == [(600, 900), (900, 950)]


async def test_overlapping_requests_share_the_flights_already_reading_their_chunks() -> None:
    reads = Reads()
    flights = table(reads)
    first, shared_first = flights.cover(0, 300, Priority.DEMAND)
    second, shared_second = flights.cover(200, 500, Priority.DEMAND)
    await settle()
    assert not shared_first and shared_second
    assert second[0] is first[0]                       # chunk 2 is joined, not read again
    assert [(f.start, f.end) for f in second] == [(0, 300), (300, 500)]
    assert reads.calls == [(0, 300), (300, 500)]     # each chunk read once
    reads.release.set()
    await asyncio.gather(*(f.task for f in first + second))


async def test_a_landed_flight_is_forgotten_and_a_later_request_reads_again() -> None:
    reads = Reads()
    reads.release.set()
    flights = table(reads)
    first, _ = flights.cover(0, 100, Priority.DEMAND)
    await first[0].task
    again, shared = flights.cover(0, 100, Priority.DEMAND)
    await again[0].task
    assert not shared and again[0] is not first[0]
    assert reads.calls == [(0, 100), (0, 100)]
    assert flights.tasks() == []


async def test_one_waiter_giving_up_does_not_cancel_the_flight_for_the_others() -> None:
    reads = Reads()
    flights = table(reads)
    (flight,), _ = flights.cover(0, 100, Priority.DEMAND)

    async def wait() -> tuple[int, int]:
        return await asyncio.shield(flight.task)

    impatient, patient = asyncio.create_task(wait()), asyncio.create_task(wait())
    await settle()
    impatient.cancel()
    await settle()
    reads.release.set()
    assert await patient == (0, 100)
    assert not flight.task.cancelled()


async def test_a_failed_flight_fails_every_waiter_and_is_not_kept() -> None:
    async def broken(start: int, end: int) -> tuple[int, int]:
        raise OSError("provider gone")

    flights: FlightTable[tuple[int, int]] = FlightTable(size=1000, chunk_size=CHUNK, piece_chunks=3,
                                                        gate=PriorityGate(1), read=broken)
    (first,), _ = flights.cover(0, 100, Priority.DEMAND)
    (second,), shared = flights.cover(0, 100, Priority.DEMAND)
    assert shared and second is first
    for waiter in (first, second):
        with pytest.raises(OSError, match="provider gone"):
            await asyncio.shield(waiter.task)
    assert flights.tasks() == []


async def test_the_gate_gives_a_freed_slot_to_demand_before_prefetch() -> None:
    gate = PriorityGate(1)
    order: list[str] = []
    await gate.acquire(gate.ticket(Priority.DEMAND))   # the only slot is taken

    async def waiter(name: str, priority: Priority) -> None:
        await gate.acquire(gate.ticket(priority))
        order.append(name)
        gate.release()

    waiters = [asyncio.create_task(waiter("prefetch-1", Priority.PREFETCH)),
               asyncio.create_task(waiter("prefetch-2", Priority.PREFETCH))]
    await settle()
    waiters.append(asyncio.create_task(waiter("demand", Priority.DEMAND)))
    await settle()
    assert gate.waiting == 3
    gate.release()
    await asyncio.gather(*waiters)
    assert order == ["demand", "prefetch-1", "prefetch-2"]   # priority first, then arrival


async def test_a_waiting_prefetch_flight_that_a_demand_request_joins_is_promoted() -> None:
    reads = Reads()
    reads.release.set()
    flights = table(reads, slots=1)
    blocker = flights.gate.ticket(Priority.DEMAND)
    await flights.gate.acquire(blocker)                   # hold the only slot
    (background,), _ = flights.cover(0, 100, Priority.PREFETCH)
    (other,), _ = flights.cover(500, 600, Priority.DEMAND)
    (joined,), shared = flights.cover(0, 100, Priority.DEMAND)
    assert shared and joined is background and background.ticket.priority == Priority.DEMAND
    await settle()
    flights.gate.release()
    await asyncio.gather(background.task, other.task)
    assert reads.calls == [(0, 100), (500, 600)]          # promoted: it arrived first among demand waiters


async def test_a_waiter_cancelled_while_waiting_leaves_the_gate_and_the_slot_goes_on() -> None:
    gate = PriorityGate(1)
    await gate.acquire(gate.ticket(Priority.DEMAND))
    cancelled = asyncio.create_task(gate.acquire(gate.ticket(Priority.DEMAND)))
    later = asyncio.create_task(gate.acquire(gate.ticket(Priority.PREFETCH)))
    await settle()
    cancelled.cancel()
    await settle()
    assert gate.waiting == 1
    gate.release()
    await asyncio.wait_for(later, 5)


async def test_a_slot_granted_to_a_waiter_cancelled_at_that_moment_is_passed_on() -> None:
    gate = PriorityGate(1)
    await gate.acquire(gate.ticket(Priority.DEMAND))
    first = asyncio.create_task(gate.acquire(gate.ticket(Priority.DEMAND)))
    second = asyncio.create_task(gate.acquire(gate.ticket(Priority.DEMAND)))
    await settle()
    gate.release()          # grants `first`, which is cancelled before it runs again
    first.cancel()
    await settle()
    assert first.cancelled()
    await asyncio.wait_for(second, 5)   # the slot went on instead of leaking
    gate.release()
    await asyncio.wait_for(gate.acquire(gate.ticket(Priority.PREFETCH)), 5)   # and one slot is left, not two
    assert gate.waiting == 0


def test_a_gate_without_slots_is_refused() -> None:
    with pytest.raises(ValueError):
        PriorityGate(0)


async def test_background_reads_never_take_the_slots_kept_for_demand() -> None:
    """With 4 slots of which 3 may go to prefetch, a queue of prefetch flights leaves one slot free: a
    reader's miss starts at once, without waiting for any prefetch to land."""
    gate = PriorityGate(4, background=3)
    prefetch = [gate.ticket(Priority.PREFETCH) for _ in range(5)]
    waiters = [asyncio.create_task(gate.acquire(ticket)) for ticket in prefetch]
    await settle()
    assert sum(w.done() for w in waiters) == 3 and gate.waiting == 2
    demand = gate.ticket(Priority.DEMAND)
    await asyncio.wait_for(gate.acquire(demand), 1)        # the kept slot, at once
    gate.release(demand)
    await settle()
    assert sum(w.done() for w in waiters) == 3            # the freed slot stays kept: prefetch may not take it
    gate.release(prefetch[0])                              # a background slot comes back: the next one goes
    await settle()
    assert sum(w.done() for w in waiters) == 4
    gate.raise_priority(prefetch[4], Priority.DEMAND)      # a reader joined the last waiting one: it goes now
    await settle()
    assert all(w.done() for w in waiters) and gate.waiting == 0
    for ticket in prefetch[1:]:
        gate.release(ticket)
    await asyncio.wait_for(gate.acquire(gate.ticket(Priority.PREFETCH)), 1)   # nothing leaked
