"""The simulated cluster (afsd/sim): eight nodes, each in its own network namespace on one bridge,
burst one never-seen image at once. One registry download per blob, every node's rootfs is what
`umoci unpack` makes of the same image, and nothing of the simulation is left afterwards."""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from afsd.lab import catalogue
from afsd.lab.oci_layout import write_oci_layout
from afsd.lab.skopeo import push_layout
from afsd.sim.burst import ImageTask, burst, rootfs_of
from afsd.sim.cluster import SimCluster, SimSettings
from afsd.lab.deadlines import sim_deadlines
from afsd.sim.network import SimNetwork, TokenInUseError
from tests.support.treecompare import compare_trees, format_differences, snapshot
from tests.support.umoci import umoci_rootfs

# The whole test's budget comes from the same place as every wait inside it (afsd/lab/deadlines.py).
pytestmark = [pytest.mark.slow, pytest.mark.timeout(sim_deadlines().small_burst_test)]


def test_a_burst_onto_eight_nodes_downloads_each_blob_once_and_every_rootfs_is_umocis(tmp_path: Path) -> None:
    sim = SimCluster(tmp_path / "sim", SimSettings(nodes=8))
    try:
        sim.start()
        assert sim.registry is not None
        spec, media_types, facts = catalogue.features_image("oci-mixed", large_file_size=4 << 20)
        layout = write_oci_layout(tmp_path / "layout", "features", spec)
        image = push_layout(layout, sim.registry.address, "sim/features", "v1", media_types=media_types,
                            facts={spec.platform: facts})
        digests = [layer.digest for layer in image.manifests[0].layers]

        result = burst(sim, image.reference, digests, ImageTask(first_file="data/hello.txt"))

        assert result.failures == []
        assert result.registry_gets == {digest: 1 for digest in digests}
        expected = snapshot(umoci_rootfs(image, spec.platform, tmp_path / "umoci"))
        for node in sim.nodes:
            differences = compare_trees(snapshot(rootfs_of(node, image.reference)), expected,
                                        labels=(node.name, "umoci"))
            assert differences == [], format_differences(differences, (node.name, "umoci"))
        assert all(timings.bytes_read > 4 << 20 for timings in result.nodes)
    finally:
        killed = sim.stop()
    assert sim.leftovers() == []
    assert killed == [], "every daemon should have stopped when asked"


def test_afsd_sim_tears_everything_down_on_sigterm_and_on_ctrl_c(tmp_path: Path) -> None:
    limits = sim_deadlines()
    for signum in (signal.SIGTERM, signal.SIGINT):
        workdir = tmp_path / f"sim-{signum}"
        command = subprocess.Popen([sys.executable, "-m", "afsd", "sim", "--nodes", "2", "--workdir", str(workdir)],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                   start_new_session=True, restore_signals=True)
        try:
            ready = _wait_for_line(command, "ready", limits.daemon_start * 2)
            token = ready.split("token ")[1].split()[0]
            os.kill(command.pid, signum)
            assert command.wait(timeout=limits.daemon_start) == (130 if signum == signal.SIGINT else 143)
        finally:
            if command.poll() is None:
                command.kill()
                command.wait()
        sim = SimCluster(workdir, token=token)
        sim.network.members.clear()
        assert sim.leftovers() == [], command.stderr.read() if command.stderr else ""


def test_a_simulation_never_takes_over_or_removes_another_ones_names() -> None:
    first = SimNetwork(secrets.token_hex(3))
    try:
        first.up()
        first.add("node0")
        same_token = SimNetwork(first.token)
        with pytest.raises(TokenInUseError):
            same_token.up()
        same_token.down()  # never claimed: removes nothing
        assert {f"network namespace {first.namespace_prefix}node0", f"interface {first.bridge_name}"} <= set(
            first.leftovers())
    finally:
        first.down()
    assert first.leftovers() == []


def _wait_for_line(command: subprocess.Popen, word: str, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    assert command.stdout is not None
    while time.monotonic() < deadline:
        line = command.stdout.readline()
        if word in line:
            return line
        if not line and command.poll() is not None:
            raise AssertionError(f"afsd sim exited with {command.returncode}: {command.stderr.read()}")
    raise AssertionError(f"afsd sim printed no {word!r} line within {timeout}s")
