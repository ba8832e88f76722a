"""Collapsing concurrent reads of the same chunks into one, and admitting reads by priority.

Where it sits: `RangeFetcher` (fetcher.py) turns each fetch into "flights": one flight reads one piece
of a blob (whole chunks) from a provider, and every fetch that needs any of those chunks while it is in
the air waits on that same flight instead of reading them again (what stargz-snapshotter does with
`singleflight.Group`, here keyed by chunk index so overlapping ranges share too). Flights take a slot of
a `PriorityGate` before they read: a freed slot goes to the waiting flight with the best (priority,
arrival), so a reader's DEMAND miss overtakes background PREFETCH, a PREFETCH flight that a DEMAND
fetch joins is promoted, and background flights never hold every slot (some are kept for DEMAND). Nothing here knows about gRPC or providers: `FlightTable` is given the read
function.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from afsd.ondemand.spec import Priority

T = TypeVar("T")


class Ticket:
    """One waiter's place at a gate; its `priority` may be raised (lowered in value) while it waits."""

    __slots__ = ("background", "granted", "priority", "seq")

    def __init__(self, priority: Priority, seq: int) -> None:
        self.priority = priority
        self.seq = seq
        self.granted: asyncio.Future[None] | None = None
        self.background = False    # it holds one of the gate's background slots


class PriorityGate:
    """A semaphore of `slots` that hands a freed slot to the waiter with the best (priority, arrival).
    Waiters below DEMAND priority hold at most `background` slots at once (default: all), so that the
    others are always free for a reader's miss, however much prefetch is queued."""

    def __init__(self, slots: int, *, background: int | None = None) -> None:
        if slots < 1:
            raise ValueError("a priority gate needs at least one slot")
        self._free = slots
        self._background_slots = slots if background is None else max(1, min(slots, background))
        self._capped = self._background_slots < slots
        self._background_held = 0
        self._waiting: list[Ticket] = []
        self._seq = itertools.count()

    def ticket(self, priority: Priority) -> Ticket:
        return Ticket(priority, next(self._seq))

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def _admits(self, ticket: Ticket) -> bool:
        return ticket.priority == Priority.DEMAND or self._background_held < self._background_slots

    def _grant(self, ticket: Ticket) -> None:
        self._free -= 1
        ticket.background = self._capped and ticket.priority != Priority.DEMAND
        self._background_held += ticket.background

    async def acquire(self, ticket: Ticket) -> None:
        """Wait for a slot. A waiter cancelled after being granted one passes it on (nothing leaks)."""
        if self._free > 0 and self._admits(ticket) and not any(self._admits(t) for t in self._waiting):
            self._grant(ticket)
            return
        ticket.granted = asyncio.get_running_loop().create_future()
        self._waiting.append(ticket)
        try:
            await ticket.granted
        except asyncio.CancelledError:
            if ticket in self._waiting:
                self._waiting.remove(ticket)
            elif ticket.granted.done() and not ticket.granted.cancelled():
                self.release(ticket)  # granted just as we were cancelled: pass the slot on
            raise

    def raise_priority(self, ticket: Ticket, priority: Priority) -> None:
        """`ticket` (waiting or holding) now stands for a read of `priority`, if that is better."""
        if priority < ticket.priority:
            ticket.priority = priority
            self._hand_out()   # a waiter the background limit held back may go now

    def release(self, ticket: Ticket | None = None) -> None:
        """Give back the slot `ticket` holds (None: a slot taken without one in mind, at full priority)."""
        if ticket is not None and ticket.background:
            ticket.background = False
            self._background_held -= 1
        self._free += 1
        self._hand_out()

    def _hand_out(self) -> None:
        while self._free > 0:
            admitted = [t for t in self._waiting if self._admits(t)]
            if not admitted:
                return
            best = min(admitted, key=lambda t: (t.priority, t.seq))
            self._waiting.remove(best)
            if best.granted is not None and not best.granted.done():
                self._grant(best)
                best.granted.set_result(None)


@dataclass(eq=False)
class Flight(Generic[T]):
    """One piece [start, end) being read: every request for its chunks awaits the same task."""

    start: int
    end: int
    ticket: Ticket
    task: asyncio.Task[T] = field(init=False)


class FlightTable(Generic[T]):
    """The flights of one blob, by chunk index. `cover(start, end)` returns the flights that together
    read [start, end) (chunk-aligned): the ones already reading some of its chunks, joined, and new ones
    of at most `piece_chunks` chunks for the rest, each running `read(start, end)` under `gate`.
    Awaiting a flight's task must go through `asyncio.shield`: a flight belongs to all its waiters, and
    one waiter giving up must not cancel it for the others."""

    def __init__(self, *, size: int, chunk_size: int, piece_chunks: int, gate: PriorityGate,
                 read: Callable[[int, int], Awaitable[T]], label: str = "") -> None:
        self.size = size
        self.chunk_size = chunk_size
        self.piece_chunks = max(1, piece_chunks)
        self.gate = gate
        self._read = read
        self._label = label
        self._by_chunk: dict[int, Flight[T]] = {}

    def cover(self, start: int, end: int, priority: Priority, *,
              read: Callable[[int, int], Awaitable[T]] | None = None) -> tuple[list[Flight[T]], bool]:
        """The flights covering [start, end), in order, and whether any of them was joined (shared). New
        flights run `read` when given instead of the table's own (a fetch receiving into its own result)."""
        chunk = self.chunk_size
        index, last = start // chunk, -(-end // chunk)
        flights: list[Flight[T]] = []
        shared = False
        while index < last:
            flight = self._by_chunk.get(index)
            if flight is not None:
                shared = True
                self.gate.raise_priority(flight.ticket, priority)  # a demand read waits on it now
                flights.append(flight)
                index = -(-flight.end // chunk)
                continue
            run_end = index + 1
            while run_end < last and run_end - index < self.piece_chunks and run_end not in self._by_chunk:
                run_end += 1
            flights.append(self._start(index, run_end, priority, read or self._read))
            index = run_end
        return flights, shared

    def tasks(self) -> list[asyncio.Task[T]]:
        """The tasks of every flight in the air (to cancel them at close)."""
        return [flight.task for flight in {id(f): f for f in self._by_chunk.values()}.values()]

    def _start(self, first: int, last: int, priority: Priority, read: Callable[[int, int], Awaitable[T]]) -> Flight[T]:
        chunk = self.chunk_size
        flight: Flight[T] = Flight(first * chunk, min(self.size, last * chunk), self.gate.ticket(priority))
        flight.task = asyncio.create_task(self._fly(flight, read), name=f"fetch {self._label} @{flight.start}")
        for index in range(first, last):
            self._by_chunk[index] = flight

        def landed(task: asyncio.Task[T]) -> None:
            for index in range(first, last):
                if self._by_chunk.get(index) is flight:
                    del self._by_chunk[index]
            if not task.cancelled():
                task.exception()  # retrieved here: every waiter may have gone

        flight.task.add_done_callback(landed)
        return flight

    async def _fly(self, flight: Flight[T], read: Callable[[int, int], Awaitable[T]]) -> T:
        await self.gate.acquire(flight.ticket)
        try:
            return await read(flight.start, flight.end)
        finally:
            self.gate.release(flight.ticket)


class Delivery:
    """What one fill flight wrote into its sink; counted once, by the first fill that collects it (the
    others joined it for bytes it had already been asked for)."""

    def __init__(self) -> None:
        self.written = 0
        self._claimed = False

    def claim(self) -> int:
        if self._claimed:
            return 0
        self._claimed = True
        return self.written


def copy_joined(result: memoryview, start: int, end: int, joined: list[tuple[Flight[Any], memoryview]]) -> None:
    """Copy into `result` (bytes [start, end) of the blob) the part within it of each joined flight's bytes."""
    for flight, data in joined:
        first, last = max(start, flight.start), min(end, flight.end)
        result[first - start:last - start] = data[first - flight.start:last - flight.start]
