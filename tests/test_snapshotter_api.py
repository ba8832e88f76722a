"""`afsd snapshotter` as containerd's snapshots API sees it: a real process on its unix socket, driven
over gRPC with containerd's own protocol. containerd relies on these rules (snapshots/storage in
containerd 1.6); tests/test_snapshotter_containerd.py runs the real containerd against it."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from google.protobuf import field_mask_pb2

from afsd.api import containerd_snapshots_pb2 as pb
from afsd.lab.daemons import Daemon
from afsd.node.records import mounted_paths
from afsd.snapshotter.lazy import IMAGE_REF_LABEL, LAYER_DIGEST_LABEL, TARGET_LABEL
from afsd.lab.containerd import SNAPSHOTTER, snapshotter_daemon, snapshotter_root
from tests.support.containerd import SnapshotsClient


@pytest.fixture
async def snapshotter(tmp_path: Path) -> AsyncIterator[tuple[Daemon, SnapshotsClient]]:
    # No node daemon answers on this socket: every layer takes containerd's own path.
    daemon = snapshotter_daemon(tmp_path, "snapshotter", tmp_path / "no-node.sock")
    await asyncio.to_thread(daemon.start)
    client = SnapshotsClient(daemon)
    try:
        yield daemon, client
    finally:
        await client.close()
        daemon.stop()
        for point in sorted((p for p in mounted_paths() if p.startswith(f"{tmp_path}/")), key=len, reverse=True):
            subprocess.run(["umount", "-l", point], check=False)


async def _status(call) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await call
    return raised.value.code(), raised.value.details()


def _option(mount, name: str) -> str:
    return next(o.split("=", 1)[1] for o in mount.options if o.startswith(name + "="))


async def test_snapshots_follow_containerds_rules(snapshotter: tuple[Daemon, SnapshotsClient],
                                                  tmp_path: Path) -> None:
    _, client = snapshotter
    stub = client.stub
    (first,) = (await stub.Prepare(pb.PrepareSnapshotRequest(snapshotter=SNAPSHOTTER, key="unpack-1"))).mounts
    assert (first.type, first.options) == ("bind", ["rw", "rbind"])
    Path(first.source, "base.txt").write_text("from the base layer\n")   # what containerd's unpack does
    await stub.Commit(pb.CommitSnapshotRequest(snapshotter=SNAPSHOTTER, name="base", key="unpack-1",
                                               labels={"layer": "base"}))
    info = (await stub.Stat(pb.StatSnapshotRequest(snapshotter=SNAPSHOTTER, key="base"))).info
    assert (info.name, info.parent, info.kind, dict(info.labels)) == ("base", "", pb.COMMITTED, {"layer": "base"})
    assert (await _status(stub.Stat(pb.StatSnapshotRequest(key="unpack-1"))))[0] == grpc.StatusCode.NOT_FOUND

    # A container's snapshot: an overlay over its parent, which the kernel mounts as given.
    (rootfs,) = (await stub.Prepare(pb.PrepareSnapshotRequest(key="container", parent="base"))).mounts
    assert rootfs.type == "overlay" and _option(rootfs, "lowerdir") == first.source
    target = tmp_path / "rootfs"
    target.mkdir()
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o", ",".join(rootfs.options), str(target)], check=True)
    try:
        assert (target / "base.txt").read_text() == "from the base layer\n"
        (target / "written.bin").write_bytes(os.urandom(100_000))
    finally:
        subprocess.run(["umount", str(target)], check=True)
    usage = await stub.Usage(pb.UsageRequest(key="container"))
    assert usage.size >= 100_000 and usage.inodes >= 2
    (view,) = (await stub.View(pb.ViewSnapshotRequest(key="view", parent="base"))).mounts
    assert (view.type, view.source, view.options) == ("bind", first.source, ["ro", "rbind"])
    assert [m.type for m in (await stub.Mounts(pb.MountsRequest(key="container"))).mounts] == ["overlay"]

    refused = [
        (stub.Commit(pb.CommitSnapshotRequest(name="x", key="view")), grpc.StatusCode.FAILED_PRECONDITION),
        (stub.Prepare(pb.PrepareSnapshotRequest(key="y", parent="container")), grpc.StatusCode.INVALID_ARGUMENT),
        (stub.Prepare(pb.PrepareSnapshotRequest(key="container", parent="base")), grpc.StatusCode.ALREADY_EXISTS),
        (stub.Prepare(pb.PrepareSnapshotRequest(key="z", parent="nothing")), grpc.StatusCode.NOT_FOUND),
        (stub.Commit(pb.CommitSnapshotRequest(name="base", key="container")), grpc.StatusCode.ALREADY_EXISTS),
        (stub.Remove(pb.RemoveSnapshotRequest(key="base")), grpc.StatusCode.FAILED_PRECONDITION),
        (stub.Mounts(pb.MountsRequest(key="base")), grpc.StatusCode.FAILED_PRECONDITION),
        (stub.Prepare(pb.PrepareSnapshotRequest(key="")), grpc.StatusCode.INVALID_ARGUMENT),
        (stub.Prepare(pb.PrepareSnapshotRequest(key="nul\0key")), grpc.StatusCode.INVALID_ARGUMENT),
        (stub.Prepare(pb.PrepareSnapshotRequest(key="big", labels={"k": "v" * 5000})),
         grpc.StatusCode.INVALID_ARGUMENT),
        (stub.Update(pb.UpdateSnapshotRequest(info=pb.Info(name="base", parent="other"),
                                              update_mask=field_mask_pb2.FieldMask(paths=["parent"]))),
         grpc.StatusCode.INVALID_ARGUMENT),
        (stub.Usage(pb.UsageRequest(key="nothing")), grpc.StatusCode.NOT_FOUND),
    ]
    for call, code in refused:
        got, details = await _status(call)
        assert got == code and details and "\n" not in details, (got, details)

    # Labels: all replaced without a mask, one key at a time with one.
    replaced = await stub.Update(pb.UpdateSnapshotRequest(info=pb.Info(name="base", labels={"x": "1", "y": "2"})))
    assert dict(replaced.info.labels) == {"x": "1", "y": "2"}
    dropped = await stub.Update(pb.UpdateSnapshotRequest(info=pb.Info(name="base"),
                                                         update_mask=field_mask_pb2.FieldMask(paths=["labels.x"])))
    assert dict(dropped.info.labels) == {"y": "2"}

    # List with containerd's filters (any filter string may match; all selectors of one must).
    async def names(*filters: str) -> list[str]:
        return sorted(info.name for info in await client.list(*filters))
    assert await names() == ["base", "container", "view"]
    assert await names("kind==committed") == ["base"]
    assert await names('labels."y"==2,parent==""') == ["base"]
    assert await names("parent==base,kind==view", "name~=^cont") == ["container", "view"]
    assert (await _status(client.list("kind=")))[0] == grpc.StatusCode.INVALID_ARGUMENT

    # CRI labels, but no node daemon to attach the layer: containerd gets a plain snapshot to unpack into.
    labels = {TARGET_LABEL: "sha256:" + "1" * 64, IMAGE_REF_LABEL: "registry.example/app:v1",
              LAYER_DIGEST_LABEL: "sha256:" + "2" * 64}
    (fallback,) = (await stub.Prepare(pb.PrepareSnapshotRequest(key="extract-2", parent="base", labels=labels))).mounts
    assert fallback.type == "overlay" and _option(fallback, "lowerdir") == first.source

    for key in ("extract-2", "container", "view", "base"):
        await stub.Remove(pb.RemoveSnapshotRequest(key=key))
    assert await client.list() == []


async def test_snapshots_survive_a_restart_and_cleanup_removes_only_what_nothing_records(
        snapshotter: tuple[Daemon, SnapshotsClient]) -> None:
    daemon, client = snapshotter
    stub = client.stub
    (layer,) = (await stub.Prepare(pb.PrepareSnapshotRequest(key="unpack"))).mounts
    Path(layer.source, "kept.txt").write_text("kept\n")
    await stub.Commit(pb.CommitSnapshotRequest(name="layer", key="unpack"))
    before = (await stub.Prepare(pb.PrepareSnapshotRequest(key="rootfs", parent="layer"))).mounts

    daemon.stop()
    await asyncio.to_thread(daemon.start)
    assert (await stub.Stat(pb.StatSnapshotRequest(key="layer"))).info.kind == pb.COMMITTED
    assert (await stub.Mounts(pb.MountsRequest(key="rootfs"))).mounts == before
    assert Path(layer.source, "kept.txt").read_text() == "kept\n"

    snapshots = snapshotter_root(daemon) / "snapshots"
    orphan = snapshots / "999"   # what a crash between the database and the disk could leave
    (orphan / "fs").mkdir(parents=True)
    await client.cleanup()
    assert not orphan.exists() and len(list(snapshots.iterdir())) == 2
    await stub.Remove(pb.RemoveSnapshotRequest(key="rootfs"))
    await stub.Remove(pb.RemoveSnapshotRequest(key="layer"))
    assert list(snapshots.iterdir()) == []


def test_a_root_overlayfs_cannot_use_is_refused_with_one_line(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "afsd", "snapshotter", "--root", str(tmp_path / "a:b"),
                             "--address", str(tmp_path / "s.sock"), "--node-socket", str(tmp_path / "n.sock")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert "cannot be an overlayfs layer path" in line and not (tmp_path / "s.sock").exists()
