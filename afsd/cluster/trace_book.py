"""Discovery's book of access traces: the runs nodes reported per blob, merged on request.

Where it sits: a node daemon that recorded what a task read first from a layer's blob reports the run
(`ReportAccessTrace`); the next node to mount that blob asks for the merge (`GetAccessTraces`) and
prefetches it. The book keys runs by blob digest (every image sharing a layer shares its trace) and keeps,
per blob, the latest run of each (node, image), at most MAX_RUNS of them, newest first. A merge prefers the
runs of the image asked about and falls back to every run of the blob. Bounded: at most MAX_BLOBS blobs and
MAX_STORED_RANGES ranges overall, least recently reported blobs forgotten first. Like the node table it is
soft state: nothing is persisted, and a restarted replica learns again from the next runs reported.

Every report is checked where it enters (afsd.cluster.peer_answers.check_trace_report) and must be about
a blob a live layerstore advertises with that size; what a reader receives it checks again against the
blob it mounts (`learned_ranges`): a forged trace costs bandwidth, never correctness.
"""

from __future__ import annotations

import time
from array import array
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from afsd.api import discovery_pb2 as pb
from afsd.cluster.trace_merge import Range, merge_runs

MAX_RUNS = 16                 # runs kept per blob (the latest of each node and image)
MAX_BLOBS = 4096              # blobs with runs
MAX_STORED_RANGES = 1 << 20   # ranges in every run of every blob (24 bytes each)


@dataclass
class _Run:
    manifest: str
    ranges: array          # offset, length, ms, offset, length, ms, ... ('q')
    reported_unix: float

    def triples(self) -> list[Range]:
        values = self.ranges
        return [(values[i], values[i + 1], values[i + 2]) for i in range(0, len(values), 3)]

    @property
    def count(self) -> int:
        return len(self.ranges) // 3


@dataclass
class _BlobRuns:
    size: int
    runs: OrderedDict[tuple[str, str], _Run] = field(default_factory=OrderedDict)   # (node, image), oldest first
    merged: dict[str, pb.AccessTrace] = field(default_factory=dict)                 # by image asked for ("": any)

    @property
    def ranges(self) -> int:
        return sum(run.count for run in self.runs.values())


class TraceBook:
    def __init__(self, *, max_runs: int = MAX_RUNS, max_blobs: int = MAX_BLOBS,
                 max_ranges: int = MAX_STORED_RANGES, clock: Callable[[], float] = time.time) -> None:
        self.max_runs = max_runs
        self.max_blobs = max_blobs
        self.max_ranges = max_ranges
        self._clock = clock
        self._blobs: OrderedDict[str, _BlobRuns] = OrderedDict()   # least recently reported first
        self._stored = 0

    def report(self, blob_digest: str, size: int, node: str, manifest: str, ranges: Sequence[Range]) -> int:
        """Keep a checked run (it replaces the same node's last run of the same image); the runs now kept."""
        blob = self._blobs.pop(blob_digest, None)
        if blob is not None and blob.size != size:   # a digest names one content: older runs were about a lie
            self._stored -= blob.ranges
            blob = None
        blob = self._blobs[blob_digest] = blob or _BlobRuns(size)
        old = blob.runs.pop((node, manifest), None)
        self._stored -= old.count if old is not None else 0
        blob.runs[(node, manifest)] = _Run(manifest, array("q", [v for r in ranges for v in r]), self._clock())
        self._stored += len(ranges)
        while len(blob.runs) > self.max_runs:
            self._stored -= blob.runs.popitem(last=False)[1].count
        blob.merged.clear()
        while self._blobs and (len(self._blobs) > self.max_blobs or self._stored > self.max_ranges):
            _, forgotten = self._blobs.popitem(last=False)
            self._stored -= forgotten.ranges
        return len(blob.runs)

    def merged(self, blob_digest: str, manifest: str = "") -> pb.AccessTrace | None:
        """What most runs of `manifest` (or, with none, of any image) read first from the blob; None: no run."""
        blob = self._blobs.get(blob_digest)
        if blob is None or not blob.runs:
            return None
        same_image = [run for run in blob.runs.values() if manifest and run.manifest == manifest]
        key = manifest if same_image else ""
        cached = blob.merged.get(key)
        if cached is None:
            runs = same_image or list(blob.runs.values())
            merged = merge_runs([run.triples() for run in runs])
            cached = blob.merged[key] = pb.AccessTrace(
                blob_digest=blob_digest, blob_size=blob.size, runs=len(runs), images=len({r.manifest for r in runs}),
                same_image=bool(same_image), updated_unix=int(max(run.reported_unix for run in runs)),
                ranges=[pb.TraceRange(offset=o, length=n, first_read_ms=ms) for o, n, ms in merged])
        return cached

    def stored_ranges(self) -> int:
        return self._stored
