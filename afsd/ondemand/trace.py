"""Startup access traces: which bytes of a blob readers ask for first after it is mounted, recorded from a
backend's misses; and the learned prefetch a backend runs from a trace the cluster merged.

Where it sits: a supervised backend (the fanotify supervisor, the fscache kernel worker) sees the reads that
reach it. A `TraceRecorder` per blob keeps the ranges first read during `window` seconds from the first read,
in first-read order, page-aligned, each byte once, bounded in count and bytes. The window counts the readers'
own time: time during which some reader of the blob waited for a fill (`stalled`) does not count, so a slow
first run (a cold node, a loaded one) records as much of the start as a fast one. The node daemon takes the
recording (`RecordedTrace`) and publishes it to discovery, which merges the runs of many nodes
(afsd/cluster/trace_merge.py). When a node mounts the blob next, it hands the merged ranges back to its
backend, which fetches them before the first miss is answered: `learned_runs` turns them into chunk runs in
first-read order (coalesced), and `LearnedPrefetch` keeps what is left to fetch and counts which fetched
chunks readers then touched (used) and which they never did (wasted).

Everything here is arithmetic on offsets (unit-tested without a kernel: tests/test_access_traces.py).
"""

from __future__ import annotations

import bisect
from collections import deque
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

PAGE = 4096
DEFAULT_WINDOW = 10.0           # seconds of a blob's first reads a node records, from its first read, stalls aside
MAX_WINDOW_FACTOR = 6           # ... but a window stays open at most this many windows of wall clock
MAX_TRACE_RANGES = 16384        # ranges in one trace (recorded, reported, merged or learned)
MAX_RECORDED_BYTES = 1 << 30    # a recording stops growing past this many bytes
MAX_LEARNED_BYTES = 1 << 30     # a learned trace makes a node prefetch at most this much of one blob

Run = tuple[int, int]           # (first chunk, chunk count)


@dataclass(frozen=True, kw_only=True)
class RecordedTrace:
    """One run's recording of one blob: `ranges` are [offset, length, first read in ms after the window
    opened], in first-read order, disjoint and page-aligned."""

    ranges: list[list[int]] = field(default_factory=list)
    window: float = 0.0
    opened: bool = False        # some read happened (the window started)
    closed: bool = False        # the window is over (or was closed early): the recording is final
    open_for: float = 0.0       # seconds the window stays open (0 once closed or before it opened)
    complete: bool = True       # every first read in the window was seen: worth publishing
    truncated: bool = False     # the bounds cut it short

    @property
    def bytes(self) -> int:
        return sum(length for _, length, _ in self.ranges)

    @property
    def publishable(self) -> bool:
        return self.closed and self.complete and bool(self.ranges)


class Intervals:
    """Disjoint [start, end) intervals; `add` returns the parts of a new interval not seen before."""

    def __init__(self) -> None:
        self._starts: list[int] = []
        self._ends: list[int] = []

    def add(self, start: int, end: int) -> list[tuple[int, int]]:
        index = bisect.bisect_left(self._ends, start)   # first interval ending at or after `start`
        new: list[tuple[int, int]] = []
        position, last = start, index
        while last < len(self._starts) and self._starts[last] <= end:
            if self._starts[last] > position:
                new.append((position, self._starts[last]))
            position = max(position, self._ends[last])
            last += 1
        if position < end:
            new.append((position, end))
        merged_start = min(start, self._starts[index]) if index < last else start
        merged_end = max(end, self._ends[last - 1]) if index < last else end
        self._starts[index:last] = [merged_start]
        self._ends[index:last] = [merged_end]
        return new


class TraceRecorder:
    """The first reads of one blob during `window` seconds from the first one (times in the caller's
    monotonic seconds). Stops (truncated) at `max_ranges` ranges or `max_bytes` bytes."""

    def __init__(self, size: int, window: float, *, max_ranges: int = MAX_TRACE_RANGES,
                 max_bytes: int = MAX_RECORDED_BYTES, created: float | None = None) -> None:
        self.size = size
        self.window = window
        self.created = time.monotonic() if created is None else created
        self.max_ranges = max_ranges
        self.max_bytes = max_bytes
        self.opened_at: float | None = None
        self.stalled_seconds = 0.0      # of the time since the window opened, readers waited for fills
        self._stall_end = float("-inf")
        self.closed = False
        self.complete = True
        self.truncated = False
        self._seen = Intervals()
        self._ranges: list[list[int]] = []
        self._bytes = 0

    def is_open(self, now: float) -> bool:
        """Whether reads at `now` are still recorded (the window closes by itself when its time is up)."""
        if not self.closed and self.opened_at is not None and (
                self._elapsed(now) > self.window or now - self.opened_at > self.window * MAX_WINDOW_FACTOR):
            self.closed = True
        return not self.closed

    def _elapsed(self, now: float) -> float:
        """Readers' own seconds since the window opened (0 before): wall clock less the time they waited for fills."""
        return 0.0 if self.opened_at is None else now - self.opened_at - self.stalled_seconds

    def stalled(self, since: float, until: float) -> None:
        """A reader of the blob waited for a fill from `since` to `until` (`until` never earlier than the last
        call's: the caller reports each wait as it ends). Overlapping waits count once."""
        if self.closed or self.opened_at is None:
            return
        since = max(since, self._stall_end, self.opened_at)
        if until > since:
            self.stalled_seconds += until - since
        self._stall_end = max(self._stall_end, until)

    def startup_over(self, now: float) -> bool:
        """Whether the startup this recording covers is over: its window closed, or no read came within a
        window's length of the recorder's creation. A whole-blob fill waits for it: it would compete with the
        startup's reads, and hide them (fscache sees only misses; a fanotify blob filled whole loses its mark).
        A recording closed before any read came (its layer's last mount went) ends the startup too."""
        if self.closed:
            return True
        if self.opened_at is None:
            return now - self.created > self.window
        return not self.is_open(now)

    def observe(self, start: int, end: int, now: float) -> None:
        """A read of [start, end) reached the backend at `now`."""
        if not self.is_open(now):
            return
        start, end = _page_span(start, end, self.size)
        if start >= end:
            return
        if self.opened_at is None:
            self.opened_at = now
        ms = int((now - self.opened_at) * 1000)
        for piece_start, piece_end in self._seen.add(start, end):
            if len(self._ranges) >= self.max_ranges or self._bytes >= self.max_bytes:
                self.truncated = self.closed = True
                return
            self._bytes += piece_end - piece_start
            _extend(self._ranges, piece_start, piece_end, ms)

    def spoil(self) -> None:
        """Bytes arrived that later reads will not report (a backend that sees only misses prefetched):
        the recording no longer says what readers read."""
        self.complete = False

    def take(self, now: float, *, close: bool) -> RecordedTrace:
        """What was recorded so far; `close` ends the window now (the blob is going away, or the startup is
        over), opened or not."""
        if close:
            self.closed = True
        open_now = self.is_open(now)
        remaining = self.window - self._elapsed(now) if open_now and self.opened_at is not None else 0.0
        return RecordedTrace(ranges=[list(r) for r in self._ranges], window=self.window,
                             opened=self.opened_at is not None, closed=not open_now,
                             open_for=max(0.0, remaining), complete=self.complete, truncated=self.truncated)


def normalise_ranges(ranges: Iterable[Sequence[int]], size: int) -> list[list[int]]:
    """[offset, length, ms] ranges as a recording would hold them: page-aligned, inside [0, size), each byte
    once (the first range that names it keeps it), contiguous neighbours joined, in the given order."""
    seen = Intervals()
    normal: list[list[int]] = []
    for offset, length, ms in ranges:
        start, end = _page_span(offset, offset + length, size)
        for piece_start, piece_end in seen.add(start, end) if start < end else ():
            _extend(normal, piece_start, piece_end, ms)
    return normal


def _page_span(start: int, end: int, size: int) -> tuple[int, int]:
    """[start, end) widened to whole pages, inside [0, size)."""
    return max(0, start) // PAGE * PAGE, min(size, -(-end // PAGE) * PAGE)


def _extend(ranges: list[list[int]], start: int, end: int, ms: int) -> None:
    """Append [start, end) first read at `ms`, joined to the last range when it continues it (a sequential
    reader makes one range)."""
    last = ranges[-1] if ranges else None
    if last is not None and last[0] + last[1] == start:
        last[1] += end - start
    else:
        ranges.append([start, end - start, ms])


def learned_runs(ranges: Iterable[tuple[int, int]], *, size: int, chunk_size: int, task_chunks: int,
                 max_bytes: int = MAX_LEARNED_BYTES) -> list[Run]:
    """The chunks holding `ranges` (first-read order), each once, as runs of consecutive chunks of at most
    `task_chunks`, in the order their first chunk is first read; at most `max_bytes` of chunks."""
    chunks = -(-size // chunk_size)
    budget = max(1, max_bytes // chunk_size)
    seen: set[int] = set()
    runs: list[Run] = []
    for offset, length in ranges:
        if length <= 0 or offset >= size or offset < 0:
            continue
        for chunk in range(offset // chunk_size, min(chunks, (min(size, offset + length) - 1) // chunk_size + 1)):
            if chunk in seen:
                continue
            if len(seen) >= budget:
                return runs
            seen.add(chunk)
            if runs and runs[-1][0] + runs[-1][1] == chunk and runs[-1][1] < task_chunks:
                runs[-1] = (runs[-1][0], runs[-1][1] + 1)
            else:
                runs.append((chunk, 1))
    return runs


@dataclass
class LearnedTimeline:
    """When a blob's learned stream ran against when its readers came (monotonic seconds, from the blob's
    registration): shown per layer so an operator sees whether a start waited for the stream."""

    registered: float = field(default_factory=time.monotonic)
    started: float | None = None          # its first fill task dispatched
    finished: float | None = None         # its last fill task done (nothing learned left to fetch)
    first_read: float | None = None       # the first read of the blob reached the backend
    bytes_at_first_read: int = 0          # learned bytes fetched by then
    waits: int = 0                        # reads that waited for a learned fill
    wait_seconds: float = 0.0             # ... in all (overlapping waits each counted)

    def details(self) -> dict[str, int]:
        def ms(at: float | None) -> int:
            return -1 if at is None else round((at - self.registered) * 1000)
        return {"learned_started_ms": ms(self.started), "learned_finished_ms": ms(self.finished),
                "learned_first_read_ms": ms(self.first_read), "learned_bytes_at_first_read": self.bytes_at_first_read,
                "learned_waits": self.waits, "learned_wait_ms": round(self.wait_seconds * 1000)}


@dataclass
class LearnedPrefetch:
    """One blob's learned prefetch: the runs left to fetch, and which fetched chunks readers touched.
    `mark_*` return the bytes that just became "used" (and read) for monotonic counters; all at chunk granularity,
    the unit every fetch is widened to (a reader of one byte of a chunk gets the whole chunk either way)."""

    size: int
    chunk_size: int
    runs: deque[Run] = field(default_factory=deque)
    ranges: int = 0                                       # ranges of the learned trace
    prefetched: set[int] = field(default_factory=set)     # chunks a learned fill wrote
    touched: set[int] = field(default_factory=set)        # chunks any read touched
    planned: frozenset[int] = frozenset()                 # every chunk of the trace
    timeline: LearnedTimeline = field(default_factory=LearnedTimeline)

    @classmethod
    def plan(cls, ranges: Sequence[tuple[int, int]], *, size: int, chunk_size: int,
             task_chunks: int) -> LearnedPrefetch:
        runs = learned_runs(ranges, size=size, chunk_size=chunk_size, task_chunks=task_chunks)
        return cls(size, chunk_size, deque(runs), ranges=len(ranges),
                   planned=frozenset(chunk for first, count in runs for chunk in range(first, first + count)))

    def _chunk_bytes(self, chunk: int) -> int:
        return min(self.size, (chunk + 1) * self.chunk_size) - chunk * self.chunk_size

    def mark_prefetched(self, chunks: Iterable[int]) -> int:
        used = 0
        for chunk in chunks:
            if chunk not in self.prefetched:
                self.prefetched.add(chunk)
                used += self._chunk_bytes(chunk) if chunk in self.touched else 0
        return used

    def mark_read(self, start: int, end: int) -> tuple[int, int]:
        """A read of [start, end): (bytes of chunks it is the first to touch, of those the ones prefetched)."""
        touched = used = 0
        for chunk in range(start // self.chunk_size, (end - 1) // self.chunk_size + 1) if end > start else ():
            if chunk not in self.touched:
                self.touched.add(chunk)
                touched += self._chunk_bytes(chunk)
                used += self._chunk_bytes(chunk) if chunk in self.prefetched else 0
        return touched, used

    def covers(self, offset: int) -> bool:
        """Whether the byte at `offset` is in a chunk of the learned trace (whoever fetched that chunk)."""
        return offset // self.chunk_size in self.planned

    @property
    def prefetched_bytes(self) -> int:
        return sum(self._chunk_bytes(chunk) for chunk in self.prefetched)

    @property
    def used_bytes(self) -> int:
        return sum(self._chunk_bytes(chunk) for chunk in self.prefetched & self.touched)

    def details(self, *, reads_seen: bool = True) -> dict[str, int]:
        """For a blob's status (`afsd mounts` shows them per layer). Without `reads_seen` (a backend that
        sees only misses: fscache never hears of a read of a prefetched byte) nothing says what was used."""
        details = {"learned_ranges": self.ranges, "learned_runs_left": len(self.runs),
                   "learned_prefetched_bytes": self.prefetched_bytes}
        if reads_seen:
            details["learned_used_bytes"] = self.used_bytes
            details.update(self.timeline.details())
        return details
