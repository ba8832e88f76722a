"""The fanotify supervisor's fill planning (afsd/ondemand/fanotify/planner.py): pure functions of holes,
chunks in flight and recent failures, tested without root, a kernel or a blob file."""

from __future__ import annotations

from afsd.ondemand.fanotify.planner import MAX_PLANS_PER_EVENT, FailureMemory, chunks_under, plan_event, plan_prefetch
from afsd.ondemand.streams import FILL_AHEAD_TASK_CHUNKS, MAX_STREAMS, Streams, chunk_runs, is_sequential, read_ahead

CHUNK = 100


def plan(gaps: list[tuple[int, int]], *, plans: int = 1, in_flight: tuple[int, ...] = (), task_chunks: int = 8,
         failures: FailureMemory | None = None, now: float = 0.0):
    return plan_event(gaps, chunk_size=CHUNK, plans=plans, task_chunks=task_chunks, in_flight=set(in_flight),
                      failures=failures or FailureMemory(), now=now)


class Holes:
    """A blob of `chunks` chunks whose chunks in `present` are filled, the rest holes."""

    def __init__(self, chunks: int, present: set[int]) -> None:
        self.size = chunks * CHUNK
        self.present = present

    def filled(self, chunk: int) -> bool:
        return chunk in self.present

    def first_hole(self, offset: int) -> int | None:
        for chunk in range(offset // CHUNK, self.size // CHUNK):
            if chunk not in self.present:
                return max(offset, chunk * CHUNK)
        return None


def test_chunk_runs_split_consecutive_chunks_at_the_longest_run() -> None:
    assert chunk_runs([1, 2, 3, 5, 6, 9], 2) == [(1, 2), (3, 1), (5, 2), (9, 1)]
    assert chunk_runs([], 4) == []


def test_chunks_under_gaps_are_every_chunk_a_gap_touches() -> None:
    assert chunks_under([(150, 10), (299, 2), (700, 100)], CHUNK) == [1, 2, 3, 7]
    assert chunks_under([(100, 0)], CHUNK) == []


def test_a_read_without_holes_is_allowed_whatever_else() -> None:
    failures = FailureMemory()
    failures.remember(0, 10, until=100.0)
    assert plan([], plans=MAX_PLANS_PER_EVENT + 5, failures=failures).allow


def test_a_read_with_holes_gets_demand_fills_for_the_chunks_under_them() -> None:
    result = plan([(120, 300), (900, 50)], task_chunks=2)
    assert result.waits and not result.join
    assert result.fill == ((1, 2), (3, 2), (9, 1))


def test_chunks_already_being_filled_are_joined_not_fetched_twice() -> None:
    result = plan([(100, 400)], in_flight=(2, 3))
    assert result.join == (2, 3) and result.fill == ((1, 1), (4, 1))


def test_a_read_whose_fills_keep_leaving_holes_fails_after_the_limit() -> None:
    assert plan([(0, 10)], plans=MAX_PLANS_PER_EVENT).waits
    failed = plan([(0, 10)], plans=MAX_PLANS_PER_EVENT + 1)
    assert failed.fail and failed.exhausted and not failed.fill


def test_recently_failed_chunks_fail_a_read_at_once_until_their_time_is_up() -> None:
    failures = FailureMemory()
    failures.remember(3, 2, until=10.0)
    failed = plan([(350, 10)], failures=failures, now=5.0)
    assert failed.fail and not failed.exhausted
    assert plan([(500, 10)], failures=failures, now=5.0).fill == ((5, 1),)   # other chunks are unaffected
    assert plan([(350, 10)], failures=failures, now=10.0).fill == ((3, 1),)  # expired: fetched again
    assert not failures.any_failed([3, 4], now=0.0)                          # and forgotten


def test_sequential_reads_continue_the_previous_one_within_a_chunk() -> None:
    assert is_sequential(1000, 1000, CHUNK) and is_sequential(1000, 950, CHUNK) and is_sequential(1000, 1100, CHUNK)
    assert not is_sequential(1000, 1101, CHUNK) and not is_sequential(1000, 0, CHUNK)


def test_read_ahead_fills_the_next_chunks_that_are_neither_present_nor_in_flight() -> None:
    blob = Holes(20, present={6})
    runs = read_ahead(450, chunk_size=CHUNK, chunks=20, fill_ahead=4, in_flight={7}, filled=blob.filled)
    assert runs == [(5, 1), (8, 1)]
    assert all(count <= FILL_AHEAD_TASK_CHUNKS for _, count in
               read_ahead(0, chunk_size=CHUNK, chunks=20, fill_ahead=9, in_flight=set(), filled=blob.filled))


def test_read_ahead_stops_at_the_blobs_end() -> None:
    blob = Holes(10, present=set())
    assert read_ahead(900, chunk_size=CHUNK, chunks=10, fill_ahead=4, in_flight=set(), filled=blob.filled) == [(9, 1)]
    assert read_ahead(1000, chunk_size=CHUNK, chunks=10, fill_ahead=4, in_flight=set(), filled=blob.filled) == []


def test_read_ahead_skips_what_was_planned_and_cuts_runs_at_the_unit() -> None:
    blob = Holes(40, present=set())
    assert read_ahead(0, chunk_size=CHUNK, chunks=40, fill_ahead=20, in_flight=set(), filled=blob.filled,
                      unit=8, planned=6) == [(6, 8), (14, 6)]


def follow(streams: Streams, start: int, end: int, *, missed: bool = False, fill_ahead: int = 4,
           max_window: int = 64):
    return streams.follow(start, end, chunk_size=CHUNK, missed=missed, fill_ahead=fill_ahead, max_window=max_window)


def test_a_sequential_reader_is_followed_and_its_window_doubles_up_to_the_limit() -> None:
    streams = Streams()
    first = follow(streams, 0, 50, missed=True)
    assert first.window == 4 and not first.sequential
    windows = [follow(streams, end - 50, end).window for end in range(100, 800, 50)]
    assert windows[:5] == [8, 16, 32, 64, 64] and set(windows[5:]) == {64}
    assert first.sequential and first.end == 750


def test_random_readers_get_a_fixed_read_around_after_a_miss_and_nothing_after_a_hit() -> None:
    streams = Streams()
    assert follow(streams, 5000, 5010, missed=True).window == 4
    assert follow(streams, 9000, 9010, missed=False).window == 0
    assert follow(streams, 2000, 2010, missed=True, fill_ahead=0).window == 0
    assert follow(streams, 2010, 2020, missed=True, fill_ahead=0).window == 0   # 0: never anything ahead


def test_a_jump_into_the_planned_window_continues_a_reader_only_where_the_daemon_sees_misses_only() -> None:
    # fanotify sees every read: a random reader's next read landing in its read-around is a jump, not a
    # sequential read (its window would grow with every hop); fscache sees only misses: a reader that read
    # what was filled ahead of it next misses past it, and that continues it.
    for misses_only, sequential in ((False, False), (True, True)):
        streams = Streams()
        reader = streams.follow(0, 10, chunk_size=CHUNK, missed=True, fill_ahead=4, max_window=64,
                                misses_only=misses_only)
        reader.planned = 4
        again = streams.follow(3 * CHUNK + 5, 3 * CHUNK + 15, chunk_size=CHUNK, missed=True, fill_ahead=4,
                               max_window=64, misses_only=misses_only)
        assert (again is reader and reader.sequential) == sequential


def test_interleaved_readers_of_one_blob_are_told_apart_and_the_oldest_forgotten() -> None:
    streams = Streams()
    a, b = follow(streams, 0, 50, missed=True), follow(streams, 10_000, 10_050, missed=True)
    assert follow(streams, 50, 100) is a and follow(streams, 10_050, 10_100) is b
    assert a.window == b.window == 8
    for index in range(MAX_STREAMS):
        follow(streams, 100_000 * (index + 1), 100_000 * (index + 1) + 10, missed=True)
    assert follow(streams, 100, 150) is not a   # forgotten: a new reader as far as the planner knows


def prefetch(blob: Holes, cursor: int, *, budget: int = 10, task_chunks: int = 3, in_flight: set[int] | None = None):
    return plan_prefetch(cursor, size=blob.size, chunk_size=CHUNK, budget=budget, task_chunks=task_chunks,
                         first_hole=blob.first_hole, in_flight=in_flight or set(), filled=blob.filled)


def test_prefetch_walks_the_holes_from_its_cursor_in_runs() -> None:
    blob = Holes(12, present={0, 1, 5})
    runs, cursor = prefetch(blob, 0)
    assert runs == [(2, 3), (6, 3), (9, 3)] and cursor == 1200


def test_prefetch_stops_at_its_budget_and_resumes_where_it_stopped() -> None:
    blob = Holes(12, present=set())
    runs, cursor = prefetch(blob, 0, budget=2)
    assert runs == [(0, 3), (3, 3)] and cursor == 600
    runs, cursor = prefetch(blob, cursor, budget=0)
    assert runs == [] and cursor == 600


def test_prefetch_wraps_around_once_and_skips_chunks_in_flight() -> None:
    blob = Holes(10, present={8, 9})
    runs, _ = prefetch(blob, 700, in_flight={1})
    assert runs == [(7, 1), (0, 1), (2, 3), (5, 2)]   # past the end it wraps to the start; chunk 1 is in flight


def test_prefetch_of_a_whole_blob_plans_nothing() -> None:
    blob = Holes(5, present=set(range(5)))
    assert prefetch(blob, 0) == ([], 0)
    assert prefetch(blob, 300)[0] == []
