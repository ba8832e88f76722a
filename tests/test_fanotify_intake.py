"""The supervisor's event intake (intake.py, afsd_take_events in c_ext/fanotify_shim.c): on the host kernel,
present ranges of a served blob are answered in C, misses still go through the planner and its workers, and
a file the supervisor does not serve is never let through, filled or not; and the one event parser
(afsd_parse_events) on bytes the kernel never sends."""

from __future__ import annotations

import asyncio
import errno
import struct
from pathlib import Path

import pytest

from afsd.ondemand.fanotify import _sys
from afsd.ondemand.fanotify.settings import Settings
from tests.support.fanotify_lab import FanotifyLab, data_files


def _drop_page_cache() -> None:
    Path("/proc/sys/vm/drop_caches").write_text("3")


async def test_present_ranges_are_answered_in_c_misses_by_the_planner_unserved_files_never(
        fanotify_lab: FanotifyLab) -> None:
    lab, blob = fanotify_lab, fanotify_lab.blob
    # inline_fill 0: every miss goes to the planner and a fetch worker (no fill in the supervisor itself)
    await lab.start(Settings(workers=1, fill_ahead=0, stream_window=0, inline_fill=0))
    served = await lab.serve()
    one, other = data_files(blob)[2], data_files(blob)[6]

    result = await lab.read(served.mount / one)            # cold: its data misses
    assert result.ok and result.sha256 == blob.files[one]
    first = (await lab.status()).counters
    assert first["events_allowed_filled"] > 0 and first["tasks_done"] > 0   # filled by a worker, planned
    assert first["events_allowed_present_intake"] <= first["events_allowed_present"]

    await asyncio.to_thread(_drop_page_cache)
    result = await lab.read(served.mount / one)            # again, from the kernel's side: every range is there
    assert result.ok and result.sha256 == blob.files[one]
    second = await lab.status()
    delta = {key: second.counters[key] - first[key] for key in first}
    assert delta["events_total"] > 0
    assert delta["events_allowed_present_intake"] == delta["events_allowed_present"] == delta["events_total"]
    assert delta["events_allowed_filled"] == delta["tasks_dispatched"] == 0
    assert sum(second.details["latency"]["present"]["counts"]) >= delta["events_total"]   # bookkeeping done after

    # No longer served (forced unregister while mounted): present or not, its reads fail, never C's to allow.
    await lab.client.unregister(served.spec.name, force=True)
    await asyncio.to_thread(_drop_page_cache)
    for name in (one, other):
        result = await lab.read(served.mount / name)
        assert not result.ok and result.errno == errno.EIO, name
    third = (await lab.status()).counters
    assert third["events_denied_unknown"] > 0
    assert third["events_allowed_present_intake"] == second.counters["events_allowed_present_intake"]


def _event(fd: int, *, version: int = 3, length: int | None = None, info: bytes = b"") -> bytes:
    metadata = struct.Struct("=IBBHQii")   # struct fanotify_event_metadata, written here only to test the C parser
    return metadata.pack(length if length is not None else metadata.size + len(info), version, 0, metadata.size,
                         0x00100000, fd, 1234) + info


def _range(offset: int, count: int) -> bytes:
    return struct.pack("=BBHIQQ", 6, 0, 24, 0, offset, count)   # struct fanotify_event_info_range


def test_the_parser_reads_ranges_and_stops_at_what_does_not_parse() -> None:
    events = list(_sys.parse_events(_event(7, info=_range(4096, 100)) + _event(8)))
    assert [(e.fd, e.pid, e.offset, e.count) for e in events] == [(7, 1234, 4096, 100), (8, 1234, None, None)]
    # An info record claiming more than its event holds is not read past the event.
    assert next(_sys.parse_events(_event(9, info=struct.pack("=BBH", 6, 0, 200) + bytes(20)))).offset is None
    for bad in (_event(5, version=2), _event(5, length=4), _event(5, length=200)):
        parsed = _sys.parse_events(_event(4) + bad)
        assert next(parsed).fd == 4                       # what came before is returned first
        with pytest.raises(OSError) as failure:
            next(parsed)
        assert failure.value.errno == errno.EPROTO
