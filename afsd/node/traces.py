"""The node daemon's side of learned prefetch (docs/learned-prefetch.md): ask the cluster what tasks read
first from the layers of an image being mounted, and tell it what this node's backends recorded.

Where it sits: `NodeDaemon` asks `learned` once it has resolved an image (one `GetAccessTraces` to
discovery, bounded in time: a slow or absent discovery costs a mount at most LOOKUP_TIMEOUT), and hands each
layer's ranges to its backend's attach (`startup`), which fetches them before the first miss is answered
and records what readers read first. After attaching, `follow` waits for the recording window to close,
takes the recording and reports it (`ReportAccessTrace` to every replica); a layer detached earlier has its
recording taken (closed) and reported first. A node that stops (`close`) gives what it recorded
`TraceSettings.report_grace` seconds to reach discovery: recordings still open are closed, taken and
reported, reports under way go on; whatever is not done by then is given up, so a stop stays prompt even
when discovery does not answer. Traces from discovery are peer data: each is checked against
the blob the mount verified (`learned_ranges`: another blob's or size refused, ranges past the end cut off),
and every byte a backend then fetches is checked against the signed chunk table.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass

import grpc
from prometheus_client import Counter

from afsd.api import discovery_pb2 as dpb
from afsd.cluster.discovery_client import DiscoveryClient, DiscoveryUnavailableError
from afsd.cluster.peer_answers import PeerAnswerError, learned_ranges
from afsd.errors import AfsdError
from afsd.ondemand.base import NO_STARTUP_TRACE, Backend, StartupTrace
from afsd.ondemand.spec import BlobSpec
from afsd.ondemand.trace import DEFAULT_WINDOW, RecordedTrace

log = logging.getLogger(__name__)

LOOKUP_TIMEOUT = 2.0       # seconds a mount waits for the cluster's traces at most
REPORT_AGAIN = 600.0       # seconds before this node reports the same blob of the same image again
FOLLOW_ROUNDS = 30         # windows to wait for a layer's first read before giving up on recording it

LOOKUPS = Counter("afsd_node_learned_traces_total", "Layers attached, by what the cluster had learned of their "
                  "first reads: hit, none, rejected (a trace that failed the checks), unavailable, off", ["result"])
REPORTS = Counter("afsd_node_trace_reports_total", "Recordings of a layer's first reads: reported (accepted by "
                  "a discovery replica), refused, incomplete (not worth reporting), skipped (reported lately)",
                  ["result"])


@dataclass(frozen=True)
class TraceSettings:
    enabled: bool = True          # use what the cluster learned, and record and report (--no-learned-prefetch)
    window: float = DEFAULT_WINDOW   # seconds of a layer's first reads recorded, from its first read
    report_grace: float = 3.0     # seconds a stopping node gives its recordings to reach discovery


class LearnedTraces:
    def __init__(self, discovery: DiscoveryClient, node_id: str, settings: TraceSettings = TraceSettings()) -> None:
        self.discovery = discovery
        self.node_id = node_id
        self.settings = settings
        self._reported: dict[tuple[str, str], float] = {}   # (blob, image) -> when (monotonic)
        self._tasks: set[asyncio.Task[None]] = set()        # recordings followed, reports under way
        self._closing = asyncio.Event()                     # the node is stopping: report what there is now

    async def learned(self, manifest_digest: str, specs: Sequence[BlobSpec]) -> dict[str, tuple[tuple[int, int], ...]]:
        """By layer digest, the ranges the cluster learned tasks of this image read first (checked, in
        first-read order); layers without a usable trace are left out."""
        if not self.settings.enabled:
            LOOKUPS.labels("off").inc(len(specs))
            return {}
        try:
            traces = await asyncio.wait_for(self.discovery.access_traces(
                [spec.blob_digest for spec in specs], manifest_digest, timeout=LOOKUP_TIMEOUT), LOOKUP_TIMEOUT * 2)
        except (DiscoveryUnavailableError, grpc.aio.AioRpcError, TimeoutError) as error:
            log.warning("no learned traces for %s: %s", manifest_digest, error or "discovery did not answer in time")
            LOOKUPS.labels("unavailable").inc(len(specs))
            return {}
        by_blob = {trace.blob_digest: trace for trace in traces}
        found: dict[str, tuple[tuple[int, int], ...]] = {}
        for spec in specs:
            trace = by_blob.get(spec.blob_digest)
            try:
                ranges = learned_ranges(trace, spec.size, peer="discovery") if trace is not None else []
            except PeerAnswerError as error:
                log.warning("ignoring the learned trace of layer %s: %s", spec.layer_digest, error)
                LOOKUPS.labels("rejected").inc()
                continue
            LOOKUPS.labels("hit" if ranges else "none").inc()
            if ranges:
                found[spec.layer_digest] = tuple(ranges)
        return found

    def startup(self, learned: tuple[tuple[int, int], ...]) -> StartupTrace:
        """What a layer's backend is asked to do at attach: fetch `learned` first, record the first reads."""
        if not self.settings.enabled:
            return NO_STARTUP_TRACE
        return StartupTrace(learned=learned, record=self.settings.window)

    def follow_in_background(self, backend: Backend, spec: BlobSpec, manifest_digest: str) -> asyncio.Task[None]:
        """`follow` as a task that `close` winds up."""
        return self._in_background(self.follow(backend, spec, manifest_digest))

    def report_in_background(self, spec: BlobSpec, manifest_digest: str, trace: RecordedTrace | None) -> None:
        """`report` as a task that `close` gives its grace period."""
        self._in_background(self.report(spec, manifest_digest, trace))

    async def follow(self, backend: Backend, spec: BlobSpec, manifest_digest: str) -> None:
        """Wait until the layer's recording window closes, then report the recording (cancelled when the
        layer goes first: then `finish`). When the node stops, the recording is closed and reported now."""
        try:
            for _ in range(FOLLOW_ROUNDS):
                closing = self._closing.is_set()
                trace = await backend.take_trace(spec, close=closing)
                if trace is None:
                    return
                if trace.closed:
                    await self.report(spec, manifest_digest, trace)
                    return
                if closing:   # nothing read yet: nothing to tell
                    return
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._closing.wait(),
                                           trace.open_for + 0.5 if trace.opened else self.settings.window)
        except (AfsdError, OSError) as error:   # e.g. its supervisor restarted: the recording is gone
            log.warning("lost the recording of layer %s's first reads: %s", spec.layer_digest, error)

    async def close(self) -> None:
        """The node is stopping: close and report the open recordings, let reports under way finish, for at
        most `report_grace` seconds; then give up what is left."""
        self._closing.set()
        pending = set(self._tasks)
        if pending:
            _, late = await asyncio.wait(pending, timeout=self.settings.report_grace)
            for task in late:
                task.cancel()
            if late:
                log.warning("gave up reporting %d recordings of first reads: discovery did not take them within "
                            "%g s", len(late), self.settings.report_grace)
            await asyncio.gather(*pending, return_exceptions=True)

    def _in_background(self, coroutine: Coroutine[object, object, None]) -> asyncio.Task[None]:
        task = asyncio.create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def finish(self, backend: Backend, spec: BlobSpec, *, detaching: bool) -> RecordedTrace | None:
        """The layer's last mount went: close its recording and take it (report it with `report`). `detaching`:
        the layer goes too (not lingering), so its backend starts no fill of the rest of its blob."""
        try:
            return await backend.take_trace(spec, close=True, detaching=detaching)
        except Exception as error:  # noqa: BLE001 - a lost recording costs nothing but the lesson
            log.warning("could not take the recording of layer %s's first reads: %s", spec.layer_digest, error)
            return None

    async def report(self, spec: BlobSpec, manifest_digest: str, trace: RecordedTrace | None) -> None:
        """Tell every discovery replica what a task read first from `spec`'s blob (if worth telling)."""
        if trace is None or not trace.publishable:
            if trace is not None and trace.ranges:
                REPORTS.labels("incomplete").inc()
            return
        key, now = (spec.blob_digest, manifest_digest), time.monotonic()
        if now - self._reported.get(key, float("-inf")) < REPORT_AGAIN:
            REPORTS.labels("skipped").inc()
            return
        self._reported = {k: at for k, at in self._reported.items() if now - at < REPORT_AGAIN}
        self._reported[key] = now
        request = dpb.ReportAccessTraceRequest(
            node_id=self.node_id, layer_digest=spec.layer_digest, blob_digest=spec.blob_digest, blob_size=spec.size,
            manifest_digest=manifest_digest, window_seconds=trace.window,
            ranges=[dpb.TraceRange(offset=o, length=n, first_read_ms=ms) for o, n, ms in trace.ranges])
        accepted = await self.discovery.report_trace(request)
        REPORTS.labels("reported" if accepted else "refused").inc()
        log.info("reported the first reads of layer %s (%d ranges, %d bytes) to %d discovery replicas",
                 spec.layer_digest, len(trace.ranges), trace.bytes, accepted)
