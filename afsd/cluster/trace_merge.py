"""Merging the access traces of many runs of one blob into the trace the next node prefetches.

Where it sits: discovery keeps, per blob, the last runs nodes reported (trace_book.py); a reader asks for
the merge. A run is a list of (offset, length, first-read ms) ranges, disjoint, in first-read order
(afsd/ondemand/trace.py). The merge keeps the bytes that a strict majority of the runs read (every byte of
a lone run; both runs of two; two of three ...), so one noisy run can neither add its own ranges nor, once
there are three runs, take the others' away; each kept stretch is placed at the median of the times the
runs that read it first read it, and stretches contiguous in that order are joined. Pure: unit-tested
in tests/test_access_traces.py.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence

from afsd.ondemand.trace import MAX_TRACE_RANGES

Range = tuple[int, int, int]      # offset, length, first read (ms after the run's first read)


def merge_runs(runs: Sequence[Sequence[Range]], *, max_ranges: int = MAX_TRACE_RANGES) -> list[Range]:
    """The merged trace of `runs` (each disjoint), in first-read order, at most `max_ranges` ranges."""
    if not runs:
        return []
    needed = len(runs) // 2 + 1
    # A sweep over every range boundary: between two boundaries the same runs read every byte.
    boundaries: list[tuple[int, int, int, int]] = []     # (position, 0 = end / 1 = start, run, ms)
    for index, run in enumerate(runs):
        for offset, length, ms in run:
            if length > 0:
                boundaries += [(offset, 1, index, ms), (offset + length, 0, index, ms)]
    boundaries.sort()
    reading: dict[int, int] = {}                         # run -> first-read ms of its range here
    stretches: list[Range] = []
    position = 0
    for at, kind, index, ms in boundaries:
        if at > position and len(reading) >= needed:
            when = int(statistics.median_low(reading.values()))
            last = stretches[-1] if stretches else None
            if last is not None and last[0] + last[1] == position and last[2] == when:
                stretches[-1] = (last[0], last[1] + at - position, when)
            else:
                stretches.append((position, at - position, when))
        position = at
        if kind:
            reading[index] = ms
        else:
            reading.pop(index, None)
    merged: list[Range] = []
    for offset, length, when in sorted(stretches, key=lambda s: (s[2], s[0])):
        last = merged[-1] if merged else None
        if last is not None and last[0] + last[1] == offset:
            merged[-1] = (last[0], last[1] + length, last[2])
        elif len(merged) >= max_ranges:
            break
        else:
            merged.append((offset, length, when))
    return merged
