"""The supervised backends' one protocol (afsd/ondemand/supervised/protocol.py): every message survives the
wire, malformed frames are refused with a ProtocolError naming the field, and the fanotify and fscache
supervisors answer a status request with the same shape, each through its real request handler over a
unix socket pair (no kernel needed: neither supervisor is started)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import socket
from pathlib import Path

import pytest

from afsd.ondemand._wire import AsyncChannel, Connection, FrameDecoder, ProtocolError, receive, send_blocking
from afsd.ondemand.cachefiles.device import BoundCache
from afsd.ondemand.cachefiles.paths import StatePaths as FscachePaths
from afsd.ondemand.cachefiles.settings import Settings as FscacheSettings
from afsd.ondemand.cachefiles.supervisor import Supervisor as FscacheSupervisor
from afsd.ondemand.fanotify.journal import Journal
from afsd.ondemand.fanotify.model import Blob
from afsd.ondemand.fanotify.paths import StatePaths as FanotifyPaths
from afsd.ondemand.fanotify.settings import Settings as FanotifySettings
from afsd.ondemand.fanotify.supervisor import Supervisor as FanotifySupervisor
from afsd.ondemand.spec import BlobSpec, Priority
from afsd.ondemand.supervised import protocol as p
from afsd.ondemand.trace import RecordedTrace

SPEC = BlobSpec(layer_digest="sha256:" + "1" * 64, blob_digest="sha256:" + "2" * 64, size=3000, chunk_size=1024,
                chunk_digests=(b"\0" * 32,) * 3, data_map=((1024, 2048),))


def wire(message: p.Message) -> p.Message:
    return p.parse(json.loads(json.dumps(message.to_json())))


def test_every_message_survives_the_wire() -> None:
    status = p.SupervisorStatus(
        backend="fanotify", pid=1, state=p.DaemonState.SERVING, uptime=2.5, settings={"workers": 2},
        counters={"events_total": 3.0}, details={"latency": {"buckets": [0.1]}},
        workers=[p.WorkerStatus(pid=7, role=p.Role.FETCH_WORKER, state=p.WorkerState.READY, tasks=1, silent_for=0.2)],
        blobs=[p.BlobStatus(name="b", size=10, present_bytes=None, path="/x", details={"tainted": False})])
    samples = [
        p.Register(id=1, spec=SPEC, source={"kind": "file", "path": "/b"}, prefetch=True, path="/x",
                   learned=[[4096, 8192]], record=10.0),
        p.TraceRequest(id=6, name="b", close=True),
        p.Reply(id=6, trace=RecordedTrace(ranges=[[4096, 8192, 0], [0, 4096, 15]], window=10.0, opened=True,
                                          closed=True, complete=False)),
        p.Unregister(name="b", force=True), p.StatusRequest(id=2), p.Watch(), p.Shutdown(force=True), p.Restart(),
        p.RestartWorker(), p.Reply(id=2, status=status), p.Reply(id=3, ok=False, error="no"),
        p.Reply(registration=p.Registration(spec=SPEC, source={}, copy_path="/c", learned=[[0, 4096]], record=5.0)),
        p.Reply(report=p.WorkerReport(counters={"requests_read": 4.0},
                                      blobs={"b": p.BlobReport(open_objects=1, present_bytes=5)})),
        p.Reply(keeper=p.KeeperStatus(pid=1, holder_pid=2, group=True, blobs=["b"], respawns=0, denying=False,
                                      orphan_denied=0)),
        p.BlobComplete(name="b", path="/x"), p.CopyComplete(name="b"),
        p.Hello(role=p.Role.SUPERVISOR, argv=["python"], env={"PATH": "/bin"}), p.Hello(role=p.Role.KERNEL_WORKER),
        p.Heartbeat(tasks=2, counters={"fetch_failovers": 1.0}),
        p.ServeBlob(name="b", path="/x", spec=SPEC, source={"kind": "file"}), p.Forget(name="b"),
        p.Fill(task=9, name="b", offset=0, length=1024, priority=Priority.PREFETCH), p.Cancel(task=9),
        p.FillDone(task=9, written=1024, source="peer:a:1"), p.FillFailed(task=9, error="gone"),
        p.Written(name="b", offset=4096, length=1 << 20),
        p.Lookup(id=4, name="b"), p.Report(id=5), p.Held(group=True, blobs=1), p.HeldBlobs(names=["b"]),
        p.HeldEnd(), p.HoldGroup(), p.HoldBlob(name="b"), p.DropBlob(name="b"), p.Bye(),
    ]
    assert {type(m) for m in samples} == set(p.MESSAGES.values())   # one sample of every message
    for message in samples:
        assert wire(message) == message


@pytest.mark.parametrize("frame, complaint", [
    ({"op": "fill", "task": "9", "name": "b", "offset": 0, "length": 1}, "fill.task: expected an integer"),
    ({"op": "fill", "task": 9, "name": "b", "offset": 0, "length": 1, "priority": 7}, "not a Priority"),
    ({"op": "unregister", "force": True}, "unregister: missing name"),
    ({"op": "register", "spec": {"size": 1}, "source": {}}, "not a valid blob spec"),
    ({"op": "register", "spec": SPEC.to_json(), "source": []}, "register.source: expected an object"),
    ({"op": "heartbeat", "counters": {"a": "many"}}, "heartbeat.counters.a: expected a number"),
    ({"op": "hello", "role": "intruder"}, "not a Role"),
    ({"op": "shutdown", "force": 1}, "shutdown.force: expected bool"),
    ({"op": "launch-missiles"}, "unknown message"),
    ({"no": "op"}, "unknown message"),
])
def test_malformed_frames_are_refused_naming_what_is_wrong(frame: dict, complaint: str) -> None:
    with pytest.raises(ProtocolError, match=complaint):
        p.parse(frame)


def test_unknown_fields_from_a_newer_peer_are_ignored() -> None:
    assert p.parse({"op": "forget", "name": "b", "reason": "newer"}) == p.Forget(name="b")


def fanotify_status(root: Path) -> dict:
    """A StatusRequest answered by a fanotify supervisor's control handler (one blob served, complete)."""
    paths = FanotifyPaths(root / "fanotify")
    paths.ensure()
    supervisor = FanotifySupervisor(paths, FanotifySettings(), Journal(paths.journal, 64), [], set(), [])
    blob = Blob(name=SPEC.name, path=str(root / "blob.erofs"), spec=SPEC, source={"kind": "file"}, prefetch=False,
                fill_fd=None, inode=(0, 0), complete=True)
    supervisor.blobs._add(blob)
    ours, theirs = socket.socketpair()
    with ours, theirs:
        connection = Connection(ours)
        send_blocking(theirs, p.StatusRequest(id=7).to_json())
        supervisor.control._on_io(connection, 1)   # selectors.EVENT_READ
        theirs.settimeout(10)
        data, fds = receive(theirs)
        ((frame, _),) = FrameDecoder().feed(data, fds)
    supervisor.journal.close()
    return frame


async def fscache_status(root: Path) -> dict:
    """A StatusRequest answered by an fscache supervisor's connection handler (one blob registered)."""
    paths = FscachePaths(root / "fscache")
    paths.ensure()
    supervisor = FscacheSupervisor(paths, FscacheSettings(), BoundCache(-1, root / "cache", "afsd", True))
    await supervisor._control(p.Register(spec=SPEC, source={"kind": "file"}, copy_path=str(root / "copy")))
    ours, theirs = socket.socketpair()
    with theirs:
        client = AsyncChannel(theirs)
        serving = asyncio.create_task(supervisor._serve_connection(AsyncChannel(ours), ours))
        await client.send(p.StatusRequest(id=7).to_json())
        frame, _ = await asyncio.wait_for(client.receive(), 10)
        await asyncio.wait_for(serving, 10)
        client.close()
    return frame


# Maps whose keys each backend defines (its settings, counter names, and what only it has).
OPEN_MAPS = ("settings", "counters", "fetch", "details")


def shape(value: object) -> object:
    """The keys of every JSON object in `value`, recursively (lists: the shape of their first item)."""
    if isinstance(value, dict):
        return {key: "map" if key in OPEN_MAPS else shape(item) for key, item in value.items()}
    if isinstance(value, list):
        return [shape(value[0])] if value else []
    return None


async def test_both_supervisors_answer_status_with_the_same_shape(tmp_path: Path) -> None:
    logging.getLogger("afsd").setLevel(logging.WARNING)
    fanotify, fscache = fanotify_status(tmp_path), await fscache_status(tmp_path)
    assert shape(fanotify) == shape(fscache)
    fanotify_reply, fscache_reply = p.parse_as(fanotify, p.Reply), p.parse_as(fscache, p.Reply)
    assert fanotify_reply.id == fscache_reply.id == 7
    assert fanotify_reply.status is not None and fscache_reply.status is not None
    assert (fanotify_reply.status.backend, fscache_reply.status.backend) == ("fanotify", "fscache")
    (fanotify_blob,), (fscache_blob,) = fanotify_reply.status.blobs, fscache_reply.status.blobs
    assert [f.name for f in dataclasses.fields(fanotify_blob)] == [f.name for f in dataclasses.fields(fscache_blob)]
    assert fanotify_blob.complete and fanotify_blob.ready and not fscache_blob.complete and not fscache_blob.ready
    assert os.getpid() == fanotify_reply.status.pid == fscache_reply.status.pid
