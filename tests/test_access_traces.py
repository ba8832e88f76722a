"""Access traces without a kernel or a network: recording first reads (afsd/ondemand/trace.py), merging runs
(afsd/cluster/trace_merge.py), discovery's book of runs (afsd/cluster/trace_book.py), and the checks on
traces that cross a socket (afsd/cluster/peer_answers.py)."""

from __future__ import annotations

import pytest

from afsd.api import discovery_pb2 as pb
from afsd.cluster.peer_answers import PeerAnswerError, check_access_traces, check_trace_report, learned_ranges
from afsd.cluster.trace_book import TraceBook
from afsd.cluster.trace_merge import merge_runs
from afsd.ondemand.trace import (PAGE, LearnedPrefetch, TraceRecorder, learned_runs, normalise_ranges)

MiB = 1 << 20
BLOB = "sha256:" + "b" * 64
LAYER = "sha256:" + "1" * 64


# -- recording ------------------------------------------------------------------------------------------


def test_a_recording_keeps_each_byte_once_in_first_read_order_page_aligned() -> None:
    recorder = TraceRecorder(10 * MiB, window=5.0)
    recorder.observe(8 * MiB + 100, 8 * MiB + 5000, now=100.0)    # first read: the window opens
    recorder.observe(0, 64 << 10, now=100.5)
    recorder.observe(64 << 10, 128 << 10, now=100.6)              # continues the last range: joined
    recorder.observe(0, 256 << 10, now=101.0)                     # only its new part counts (joined too)
    recorder.observe(MiB, MiB + 1, now=101.0)
    trace = recorder.take(101.0, close=False)
    assert trace.ranges == [[8 * MiB, 2 * PAGE, 0], [0, 256 << 10, 500], [MiB, PAGE, 1000]]
    assert trace.opened and not trace.closed and trace.open_for == pytest.approx(4.0)
    assert not trace.publishable


def test_the_window_closes_by_itself_and_later_reads_are_not_recorded() -> None:
    recorder = TraceRecorder(MiB, window=2.0)
    assert not recorder.take(0.0, close=False).opened
    recorder.observe(0, PAGE, now=10.0)
    recorder.observe(PAGE * 10, PAGE * 11, now=12.5)
    trace = recorder.take(12.5, close=False)
    assert trace.closed and trace.ranges == [[0, PAGE, 0]] and trace.publishable


def test_time_readers_spend_waiting_for_fills_does_not_count_against_the_window() -> None:
    recorder = TraceRecorder(MiB, window=2.0)
    recorder.observe(0, PAGE, now=10.0)
    recorder.stalled(10.0, 11.5)                 # the first read waited 1.5 s for its fill
    recorder.stalled(11.0, 12.0)                 # another reader, overlapping: only 11.5-12.0 is new
    recorder.stalled(9.0, 9.5)                   # before the window opened: nothing
    assert recorder.stalled_seconds == pytest.approx(2.0)
    recorder.observe(PAGE * 10, PAGE * 11, now=13.5)    # 3.5 s of wall clock, 1.5 s of the readers' own
    trace = recorder.take(13.5, close=False)
    assert not trace.closed and trace.open_for == pytest.approx(0.5)
    assert trace.ranges == [[0, PAGE, 0], [PAGE * 10, PAGE, 3500]]
    assert recorder.take(14.1, close=False).closed


def test_a_window_of_stalled_readers_still_closes_after_a_bounded_wall_clock() -> None:
    recorder = TraceRecorder(MiB, window=2.0)
    recorder.observe(0, PAGE, now=10.0)
    recorder.stalled(10.0, 30.0)
    assert recorder.is_open(21.9) and not recorder.is_open(22.1)     # MAX_WINDOW_FACTOR windows of wall clock


def test_the_startup_a_recording_covers_is_over_when_its_window_closes_or_no_read_came() -> None:
    unread = TraceRecorder(MiB, window=2.0, created=10.0)
    assert not unread.startup_over(11.0) and unread.startup_over(12.5)     # nobody read it within a window
    read = TraceRecorder(MiB, window=2.0, created=10.0)
    read.observe(0, PAGE, now=11.5)
    assert not read.startup_over(13.0) and read.startup_over(13.6)         # two seconds from the first read
    closed = TraceRecorder(MiB, window=2.0, created=10.0)                  # its layer's last mount went, unread
    assert not closed.startup_over(10.5)
    assert closed.take(10.5, close=True).closed and closed.startup_over(10.5)
    closed.observe(0, PAGE, now=10.6)
    assert closed.take(10.6, close=False).ranges == []                     # nothing is recorded after the close


def test_a_recording_stops_at_its_bounds_and_says_so() -> None:
    recorder = TraceRecorder(100 * MiB, window=60.0, max_ranges=3)
    for index in range(10):
        recorder.observe(index * 2 * PAGE, index * 2 * PAGE + PAGE, now=float(index) / 100)
    trace = recorder.take(1.0, close=False)
    assert len(trace.ranges) == 3 and trace.truncated and trace.closed


def test_a_spoiled_or_unclosed_recording_is_not_worth_publishing() -> None:
    recorder = TraceRecorder(MiB, window=60.0)
    recorder.observe(0, PAGE, now=1.0)
    assert not recorder.take(2.0, close=False).publishable       # still open
    recorder.spoil()
    trace = recorder.take(3.0, close=True)
    assert trace.closed and not trace.complete and not trace.publishable


def test_normalising_clamps_to_the_blob_drops_repeats_and_keeps_the_order() -> None:
    size = 10 * PAGE + 100
    ranges = [(5 * PAGE + 1, 10, 7), (0, PAGE, 9), (5 * PAGE, PAGE, 11), (9 * PAGE, 1 << 40, 12), (1 << 50, 5, 13)]
    assert normalise_ranges(ranges, size) == [[5 * PAGE, PAGE, 7], [0, PAGE, 9], [9 * PAGE, size - 9 * PAGE, 12]]


# -- learned prefetch -------------------------------------------------------------------------------------


def test_learned_runs_are_chunks_in_first_read_order_coalesced_and_bounded() -> None:
    ranges = [(5 * MiB + 10, 100), (1 * MiB, 2 * MiB), (5 * MiB, 10), (6 * MiB, MiB + 1), (40 * MiB, 4)]
    runs = learned_runs(ranges, size=20 * MiB, chunk_size=MiB, task_chunks=2)
    assert runs == [(5, 1), (1, 2), (6, 2)]          # chunk 5, chunks 1-2, chunks 6-7; past the end dropped
    assert learned_runs(ranges, size=20 * MiB, chunk_size=MiB, task_chunks=8, max_bytes=2 * MiB) == [(5, 1), (1, 1)]


def test_learned_prefetch_counts_what_readers_used_of_what_it_fetched() -> None:
    learned = LearnedPrefetch.plan([(0, 3 * MiB)], size=3 * MiB - 100, chunk_size=MiB, task_chunks=8)
    assert list(learned.runs) == [(0, 3)]
    assert learned.mark_read(10, 20) == (MiB, 0)          # read before it was fetched (the reader joined it)
    assert learned.mark_prefetched(range(3)) == MiB       # ... counts as used once it lands
    assert learned.mark_read(2 * MiB, 2 * MiB + 1) == (MiB - 100, MiB - 100)   # the short last chunk
    assert learned.mark_read(0, 1) == (0, 0)              # once per chunk
    assert (learned.prefetched_bytes, learned.used_bytes) == (3 * MiB - 100, 2 * MiB - 100)
    assert learned.details()["learned_used_bytes"] == 2 * MiB - 100
    assert "learned_used_bytes" not in learned.details(reads_seen=False)
    assert learned.covers(2 * MiB) and not learned.covers(3 * MiB)   # the trace's chunks, however they came


# -- merging runs -----------------------------------------------------------------------------------------


def test_a_lone_run_is_its_own_merge() -> None:
    run = [(8192, 4096, 0), (0, 4096, 30)]
    assert merge_runs([run]) == run


def test_the_merge_keeps_what_most_runs_read_ordered_by_the_median_first_read() -> None:
    runs = [[(0, 100, 0), (1000, 100, 10), (5000, 50, 20)],
            [(1000, 100, 0), (0, 100, 15), (7000, 10, 5)],
            [(0, 100, 2), (1000, 100, 12)]]
    # [0,100): times 0, 15, 2 -> median 2; [1000,1100): 10, 0, 12 -> 10; the rest only one run read.
    assert merge_runs(runs) == [(0, 100, 2), (1000, 100, 10)]


def test_one_noisy_run_neither_bloats_the_merge_nor_takes_from_it() -> None:
    task = [(index * 100, 50, index) for index in range(20)]
    noise = [(index * 100, 50, 1000 - index) for index in range(0, 20, 2)] + [(1 << 20, 1 << 20, 0)]
    merged = merge_runs([task, task, noise])
    assert merged == task                                   # nothing of the noise's own, nothing lost
    assert merge_runs([task, noise]) == [(index * 100, 50, index) for index in range(0, 20, 2)]   # two: both


def test_stretches_contiguous_in_first_read_order_are_joined_and_the_count_is_bounded() -> None:
    runs = [[(0, 100, 0), (100, 100, 1), (300, 100, 2)]]
    assert merge_runs(runs) == [(0, 200, 0), (300, 100, 2)]
    many = [[(index * 10, 5, index) for index in range(100)]]
    assert len(merge_runs(many, max_ranges=7)) == 7


# -- discovery's book -------------------------------------------------------------------------------------


def test_the_book_prefers_runs_of_the_image_asked_about_and_replaces_a_nodes_last_run() -> None:
    book = TraceBook()
    image_a, image_b = "sha256:" + "a" * 64, "sha256:" + "c" * 64
    book.report(BLOB, 10 * MiB, "n1", image_a, [(0, PAGE, 0)])
    book.report(BLOB, 10 * MiB, "n1", image_a, [(PAGE, PAGE, 0)])     # n1's newer run of image a replaces it
    book.report(BLOB, 10 * MiB, "n2", image_b, [(8 * PAGE, PAGE, 0)])
    own = book.merged(BLOB, image_a)
    assert own is not None and own.same_image and own.runs == 1 and [(r.offset, r.length) for r in own.ranges] == [(PAGE, PAGE)]
    other = book.merged(BLOB, "sha256:" + "d" * 64)      # an image with no runs: every image's runs
    assert other is not None and not other.same_image and other.runs == 2 and other.images == 2
    assert other.ranges == []                             # two runs agreeing on nothing
    assert book.merged("sha256:" + "e" * 64) is None


def test_the_book_is_bounded_in_runs_blobs_and_ranges() -> None:
    book = TraceBook(max_runs=3, max_blobs=2, max_ranges=10)
    for node in range(5):
        assert book.report(BLOB, MiB, f"n{node}", "", [(0, PAGE, 0)]) == min(node + 1, 3)
    book.report("sha256:" + "2" * 64, MiB, "n", "", [(0, PAGE, 0)])
    book.report("sha256:" + "3" * 64, MiB, "n", "", [(0, PAGE, 0)])
    assert book.merged(BLOB) is None                      # the least recently reported blob went
    book.report("sha256:" + "4" * 64, MiB, "n", "", [(index * 2 * PAGE, PAGE, 0) for index in range(9)])
    assert book.stored_ranges() <= 10


# -- checks on traces that cross a socket ----------------------------------------------------------------


def report(**fields: object) -> pb.ReportAccessTraceRequest:
    base: dict[str, object] = {"node_id": "n", "layer_digest": LAYER, "blob_digest": BLOB, "blob_size": MiB,
                               "ranges": [pb.TraceRange(offset=0, length=PAGE)]}
    return pb.ReportAccessTraceRequest(**{**base, **fields})


@pytest.mark.parametrize("fields, problem", [
    ({"blob_digest": "sha256:../etc"}, "blob digest"),
    ({"blob_size": 0}, "blob size 0"),
    ({"ranges": [pb.TraceRange(offset=-4096, length=PAGE)]}, "negative offset"),
    ({"ranges": [pb.TraceRange(offset=0, length=1)] * 20000}, "20000 ranges"),
])
def test_a_malformed_report_is_refused(fields: dict[str, object], problem: str) -> None:
    with pytest.raises(PeerAnswerError, match=problem):
        check_trace_report(report(**fields), peer="test")


def test_a_report_past_the_blobs_end_is_cut_to_the_blob() -> None:
    ranges = [pb.TraceRange(offset=MiB - 100, length=1 << 40), pb.TraceRange(offset=2 * MiB, length=PAGE)]
    assert check_trace_report(report(ranges=ranges), peer="test") == [[MiB - PAGE, PAGE, 0]]


def test_an_answer_about_another_blob_or_of_another_size_is_refused_and_the_end_clamped() -> None:
    other = pb.AccessTrace(blob_digest="sha256:" + "f" * 64, blob_size=MiB)
    with pytest.raises(PeerAnswerError, match="not asked for"):
        check_access_traces(pb.GetAccessTracesResponse(traces=[other]), {BLOB}, peer="test")
    resized = pb.AccessTrace(blob_digest=BLOB, blob_size=2 * MiB)
    with pytest.raises(PeerAnswerError, match="not 1048576"):
        learned_ranges(resized, MiB, peer="test")
    past = pb.AccessTrace(blob_digest=BLOB, blob_size=MiB, ranges=[
        pb.TraceRange(offset=MiB - PAGE, length=10 * MiB), pb.TraceRange(offset=5 * MiB, length=PAGE)])
    assert learned_ranges(past, MiB, peer="test") == [(MiB - PAGE, PAGE)]
