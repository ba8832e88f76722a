"""The afsd container image and deploy/kubernetes's pods, run as a kubelet would run them (tests/support/
pods.py): the image built by scripts/build-image.sh (cached by its inputs), each pod in its own network
namespace under runc with the manifest's args, env, volumes, propagation and security context; the
afs-sdk Execute scenario through the proxy pod; an image mounted on the node pod, seen on the host, and
adopted by the node daemon's next container; nothing left behind."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from afsd.lab.catalogue import busybox_layers
from afsd.lab.oci_layout import ImageSpec, write_oci_layout
from afsd.lab.registry import start_registry
from afsd.lab.skopeo import push_layout
from tests.support.afslet import tools_layer
from tests.support.manifests import load_objects, workloads
from tests.support.pods import PodCluster, built_image, unpacked_image
from tests.support.proxy import ProxySdkCall

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def afsd_image(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str], str]:
    layout, digest = built_image(tmp_path_factory.mktemp("image") / "layout")
    rootfs, env = unpacked_image(layout, digest)
    return rootfs, env, digest


def test_the_image_runs_afsd_version_under_runc(afsd_image, tmp_path: Path) -> None:
    rootfs, env, _ = afsd_image
    bundle = tmp_path / "bundle"
    (bundle / "rootfs").mkdir(parents=True)
    config = {"ociVersion": "1.0.2", "root": {"path": str(rootfs), "readonly": True},
              "process": {"terminal": False, "user": {"uid": 65534, "gid": 65534}, "cwd": "/",
                          "args": ["/usr/local/bin/afsd", "--version"], "env": env, "noNewPrivileges": True},
              "mounts": [{"destination": "/proc", "type": "proc", "source": "proc"}],
              "linux": {"namespaces": [{"type": t} for t in ("pid", "mount", "ipc", "uts", "network")]}}
    (bundle / "config.json").write_text(json.dumps(config))
    result = subprocess.run(["runc", "--root", str(tmp_path / "runc"), "run", "--bundle", str(bundle),
                             f"afsd-version-{tmp_path.name[-8:]}"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "afsd 0.1.0"


def test_the_pods_serve_an_execute_through_the_proxy_and_a_mount_survives_the_node_daemon(afsd_image,
                                                                                          tmp_path: Path) -> None:
    rootfs, env, _ = afsd_image
    cluster = PodCluster(tmp_path, rootfs, env)
    registry = None
    try:
        registry = start_registry(tmp_path / "registry", host=cluster.gateway)
        scratch = tmp_path / "scratch"
        scratch.mkdir()
        layout = write_oci_layout(tmp_path / "layouts" / "tools", "v1",
                                  ImageSpec((*busybox_layers(scratch), tools_layer())))
        shutil.rmtree(scratch)
        image = push_layout(layout, registry.address, "afsd-test/tools", "v1").reference

        by_name = {w.name: w for w in workloads(load_objects())}
        # The two deviations from the manifests: the lab registry speaks plain HTTP, and afslet's cgroups
        # go under a parent of this run's own (other runs on this machine use /afsd-let's neighbours).
        insecure = [f"--insecure-registry={registry.address}"]
        discovery = cluster.run_pod(by_name["afsd-discovery"], {"discovery": insecure})
        cluster.publish("afsd-discovery", [discovery])
        node = cluster.run_pod(by_name["afsd-node"], {
            "layerstore": insecure, "afslet": [f"--cgroup-parent=/{cluster.token}-let"]})
        cluster.publish("afsd-afslet", [node])
        proxy = cluster.run_pod(by_name["afsd-proxy"])
        cluster.publish("afsd-proxy-peers", [proxy])

        # Every container is live and ready on its probes' real endpoints.
        for pod in (discovery, node, proxy):
            for name in pod.running:
                for kind in ("livenessProbe", "readinessProbe"):
                    if kind in pod.container(name).spec:
                        assert pod.probe(name, kind)[0] == 200, (pod.name, name, kind)

        # afs-sdk's Execute through the proxy pod, placed on the node pod's afslet by DNS.
        call = ProxySdkCall({"address": f"{proxy.ip}:62051", "op": "execute", "extra_entries": [], "input": {
            "image": image,
            "command": ["/bin/sh", "-c", "echo hello from $(hostname) > /root/out.txt; cat /root/out.txt"],
            "cpu_cores": 1, "memory_mb": 256, "timeout_ms": 60_000}}).finish()
        assert call.result["exit_code"] == 0, call.events
        assert call.stdout == [call.stdout[0]] and call.stdout[0].startswith("hello from ")
        assert call.files()["root/out.txt"].startswith(b"hello from ")

        # An image mounted on the node pod reaches the host through the Bidirectional volume.
        target = "/var/lib/afsd/mnt/tools"
        (cluster.host_root / target.lstrip("/")).mkdir(parents=True)
        mounted = node.exec("node", "afsd", "mount", image, target)
        assert mounted.returncode == 0, mounted.stderr
        on_host = cluster.host_root / target.lstrip("/")
        assert (on_host / "etc" / "passwd").read_bytes().startswith(b"root:")

        def mounts() -> list[dict]:
            listed = node.exec("node", "afsd", "mounts", "--json")
            assert listed.returncode == 0, listed.stderr
            return json.loads(listed.stdout).get("mounts", [])

        # Upgrade: the node daemon's container restarts; its successor adopts the live mount.
        wait_for_whole_blobs(mounts)
        node.stop_container("node")
        node.start_container("node")
        node.wait_probe("node", "readinessProbe")
        assert [m["target"] for m in mounts()] == [target]
        assert (on_host / "bin" / "busybox").stat().st_size > 0
        unmounted = node.exec("node", "afsd", "umount", target)
        assert unmounted.returncode == 0, unmounted.stderr
        assert not on_host.is_mount()

        # Graceful termination in the kubelet's order: afslet drains and exits 0, then the sidecars.
        codes = node.stop()
        assert codes == {"afslet": 0, "node": 0, "layerstore": 0}
    finally:
        cluster.close()
        if registry is not None:
            registry.stop()
    assert cluster.leftovers() == []


def wait_for_whole_blobs(mounts, timeout: float = 120.0) -> None:
    """Until every layer of every mount is on the node (the background fill completed)."""
    deadline = time.monotonic() + timeout
    while any(m.get("bytes_cached", 0) != m.get("bytes_total", 0) for m in mounts()):
        assert time.monotonic() < deadline, mounts()
        time.sleep(0.5)
