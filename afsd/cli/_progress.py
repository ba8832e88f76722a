"""Progress of several layers at once on the command line (`afsd convert`): on a terminal, one redrawn
bar per layer in flight; otherwise (a log, a pipe) a plain line per layer every few seconds. Finished
layers get a line of their own that stays. Updates may come from worker threads."""

from __future__ import annotations

import sys
import threading
import time
from typing import TextIO

from afsd.progress import StageMeter

BAR_WIDTH = 24
TERMINAL_REFRESH = 0.2     # seconds between redraws
PLAIN_INTERVAL = 5.0       # seconds between lines about one item when not on a terminal


class ProgressBoard:
    def __init__(self, stream: TextIO = sys.stderr, *, interactive: bool | None = None) -> None:
        self._stream = stream
        self._interactive = stream.isatty() if interactive is None else interactive
        self._items: dict[str, StageMeter] = {}
        self._said: dict[str, float] = {}        # plain mode: when each item last got a line
        self._drawn = 0                           # terminal mode: lines of the board on screen
        self._last_draw = 0.0
        self._lock = threading.Lock()

    def update(self, item: str, stage: str, done: int = 0, total: int = 0) -> None:
        """`item` is in `stage`, `done` of `total` bytes (0, 0: a stage without a byte count)."""
        with self._lock:
            meter = self._items.get(item)
            new_stage = meter is None or meter.stage != stage
            if new_stage:
                meter = self._items[item] = StageMeter(stage, total)
            meter.update(done, total)
            if self._interactive:
                if new_stage or time.monotonic() - self._last_draw >= TERMINAL_REFRESH:
                    self._redraw()
            elif new_stage or time.monotonic() - self._said.get(item, 0.0) >= PLAIN_INTERVAL:
                self._said[item] = time.monotonic()
                self._stream.write(f"  {item}  {meter.describe()}\n")
                self._stream.flush()

    def finish(self, item: str, line: str) -> None:
        """`item` is done: `line` stays on screen, its bar goes."""
        with self._lock:
            self._items.pop(item, None)
            self._said.pop(item, None)
            if self._interactive:
                self._erase()
                self._stream.write(f"  {item}  {line}\n")
                self._redraw()
            else:
                self._stream.write(f"  {item}  {line}\n")
                self._stream.flush()

    def close(self) -> None:
        with self._lock:
            if self._interactive:
                self._erase()
                self._stream.flush()
            self._items.clear()

    def _erase(self) -> None:
        if self._drawn:
            self._stream.write(f"\x1b[{self._drawn}F\x1b[J")   # up to the board's first line, clear below
            self._drawn = 0

    def _redraw(self) -> None:
        self._erase()
        for item, meter in self._items.items():
            self._stream.write(f"  {item}  {_bar(meter.fraction)} {meter.describe()}\n")
        self._drawn = len(self._items)
        self._last_draw = time.monotonic()
        self._stream.flush()


def _bar(fraction: float | None) -> str:
    if fraction is None:
        return "[" + " " * BAR_WIDTH + "]"
    filled = int(fraction * BAR_WIDTH)
    return "[" + "#" * filled + "." * (BAR_WIDTH - filled) + "]"
