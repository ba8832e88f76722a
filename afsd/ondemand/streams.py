"""Sequential readers told apart from random ones, and how far ahead of each to fill: shared by both
supervised backends (the fanotify supervisor's planner.py and the fscache worker).

A stream is one reader of a blob as seen through the reads that reach the daemon: a read that continues
one (within a chunk of where it ended) is its next read and doubles the window filled ahead of it, up to
a maximum, so a sequential reader soon has large units coming ahead of it at the link's rate; any other
read starts a new stream. Pure functions of chunk indexes and offsets (tests/test_fanotify_planner.py).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass

FILL_AHEAD_TASK_CHUNKS = 2    # fill-ahead around a single miss goes in tasks this small
MAX_STREAMS = 8               # readers of one blob followed at once (sequential detection)

Run = tuple[int, int]         # (first chunk, chunk count)


def chunk_runs(chunks: Iterable[int], longest: int) -> list[Run]:
    """Consecutive chunk indexes (in order) as (first, count) runs of at most `longest`."""
    runs: list[Run] = []
    for chunk in chunks:
        if runs and runs[-1][0] + runs[-1][1] == chunk and runs[-1][1] < longest:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((chunk, 1))
    return runs



def is_sequential(previous_end: int, start: int, chunk_size: int) -> bool:
    """Whether a read starting at `start` continues the previous one, which ended at `previous_end`."""
    return previous_end - chunk_size <= start <= previous_end + chunk_size


@dataclass
class Stream:
    """One reader of a blob as seen through its reads: where its last read ended, how many chunks to keep
    filled ahead of it, and up to which chunk that was already planned (filled or given to a task)."""

    end: int
    window: int
    planned: int = 0
    reads: int = 1

    @property
    def sequential(self) -> bool:
        return self.reads > 1

    def continued_by(self, start: int, chunk_size: int, *, misses_only: bool) -> bool:
        """Whether a read starting at `start` is this reader's next one: it continues its last read or, where
        the daemon sees only reads of missing bytes (`misses_only`: fscache), lands in (or just past) what
        was planned ahead of it: a reader that read the bytes filled ahead of it raised no read for them, so
        its next one starts past them, and taken for a new, random reader it would lose its read-ahead each
        time it caught up. (fanotify sees every read: there, a read landing ahead is a jump.)"""
        reach = max(self.end, self.planned * chunk_size) if misses_only else self.end
        return self.end - chunk_size <= start <= reach + chunk_size


class Streams:
    """The readers of one blob, told apart by where they read: a read that continues one (within a chunk
    of where it ended) is that reader's next read and doubles its window, up to `max_window` chunks (a
    sequential reader soon has the link's worth of bytes coming ahead of it, in large units, as the
    kernel's own read-ahead grows); any other read starts a new one, whose window is `fill_ahead` after a
    miss (a fixed read-around for random readers) and nothing after a read of bytes already there.
    The MAX_STREAMS most recent are kept."""

    def __init__(self) -> None:
        self._recent: list[Stream] = []

    def follow(self, start: int, end: int, *, chunk_size: int, missed: bool, fill_ahead: int,
               max_window: int, misses_only: bool = False) -> Stream:
        for stream in reversed(self._recent):
            if stream.continued_by(start, chunk_size, misses_only=misses_only):
                self._recent.remove(stream)
                self._recent.append(stream)
                stream.end, stream.reads = end, stream.reads + 1
                if fill_ahead:
                    stream.window = min(max(max_window, fill_ahead), max(fill_ahead, 2 * stream.window))
                return stream
        stream = Stream(end=end, window=fill_ahead if missed else 0)
        self._recent = [*self._recent[-(MAX_STREAMS - 1):], stream]
        return stream


def read_ahead(end: int, *, chunk_size: int, chunks: int, fill_ahead: int, in_flight: Collection[int],
               filled: Callable[[int], bool], unit: int = FILL_AHEAD_TASK_CHUNKS, planned: int = 0) -> list[Run]:
    """The runs to fill after a read ending at `end`: the next `fill_ahead` chunks that are neither filled
    nor being filled (nor before `planned`, which was seen to already), in tasks of at most `unit` chunks:
    small ones around a single miss (a reader's own chunk is not held up behind them), large ones ahead of
    a sequential reader."""
    first = -(-end // chunk_size)
    ahead = [chunk for chunk in range(max(first, planned), min(chunks, first + fill_ahead))
             if chunk not in in_flight and not filled(chunk)]
    return chunk_runs(ahead, unit)
