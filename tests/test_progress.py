"""Progress a person can read: bytes done of the total and the rate, as bars on a terminal and as plain
lines in a log or a pipe (afsd/progress.py, afsd/cli/_progress.py)."""

from __future__ import annotations

import io

from afsd.cli._progress import ProgressBoard
from afsd.progress import StageMeter


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_stage_says_bytes_done_of_the_total_share_and_rate() -> None:
    clock = Clock()
    meter = StageMeter("downloading", 45_600_000, clock=clock)
    clock.now += 2.0
    meter.update(12_300_000)
    assert meter.describe() == "downloading 12.3 of 45.6 MB (27%), 6.2 MB/s"
    unsized = StageMeter("building erofs", clock=clock)
    clock.now += 3.0
    assert unsized.describe() == "building erofs (3s)"


def test_without_a_terminal_each_stage_gets_a_plain_line_and_finished_items_a_line_of_their_own() -> None:
    out = io.StringIO()
    board = ProgressBoard(out, interactive=False)
    board.update("sha256:aaaa", "downloading", 0, 1_000_000)
    board.update("sha256:aaaa", "downloading", 500_000, 1_000_000)   # too soon for another line
    board.update("sha256:aaaa", "unpacking", 10, 1_000_000)
    board.finish("sha256:aaaa", "converted")
    board.close()
    lines = out.getvalue().splitlines()
    assert [line.split()[:2] for line in lines] == [["sha256:aaaa", "downloading"], ["sha256:aaaa", "unpacking"],
                                                    ["sha256:aaaa", "converted"]]
    assert lines[0].endswith("downloading 0.0 of 1.0 MB (0%)")   # no rate yet: it has only just begun
    assert "\x1b" not in out.getvalue()


def test_on_a_terminal_bars_are_redrawn_in_place_and_erased_when_done() -> None:
    out = io.StringIO()
    board = ProgressBoard(out, interactive=True)
    board.update("sha256:aaaa", "downloading", 0, 1_000_000)
    board.update("sha256:bbbb", "downloading", 0, 2_000_000)
    board.update("sha256:aaaa", "unpacking", 500_000, 1_000_000)
    screen = out.getvalue()
    assert "[############............]" in screen          # half the bar for 50%
    assert "\x1b[2F\x1b[J" in screen                      # two bars redrawn in place
    board.finish("sha256:aaaa", "converted")
    board.close()
    tail = out.getvalue()[len(screen):]
    assert "  sha256:aaaa  converted\n" in tail and tail.endswith("\x1b[1F\x1b[J")   # bbbb's bar erased at the end
