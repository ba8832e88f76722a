"""The afsd container image and deploy/kubernetes's pods, run as a kubelet would run them (tests/support/
pods.py): the image built by scripts/build-image.sh (cached by its inputs), each pod in its own network
namespace under runc with the manifest's args, env, volumes, propagation and security context, on
mutual TLS — the TLS Secrets are what cert-manager would write for the cert-manager overlay's
Certificates (tests/support/certmanager.py), the node pod issues its own certificate from the CA Secret;
the afs-sdk Execute scenario through the proxy pod with a user certificate made by `afsd certs`; a
containerd on the host pulling an image through the node pod's snapshotter, its layers served lazily; an
image mounted on the node pod, seen on the host, and adopted by the node daemon's next container;
nothing left behind."""

from __future__ import annotations

import asyncio
import json
import secrets
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from afsd.lab.catalogue import busybox_layers
from afsd.lab.containerd import CriClient, start_containerd
from afsd.lab.daemons import with_resolv_conf
from afsd.lab.oci_layout import ImageSpec, write_oci_layout
from afsd.lab.registry import start_registry
from afsd.lab.skopeo import push_layout
from tests.support.afslet import tools_layer
from tests.support.certmanager import issue_all
from tests.support.manifests import MANIFESTS, load_objects, with_components, workloads
from tests.support.metrics import metric, scrape
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
    objects = load_objects(MANIFESTS / "overlays" / "cert-manager")
    tls_secrets = issue_all(objects)   # what cert-manager writes for the overlay's Certificates
    cluster = PodCluster(tmp_path, rootfs, env, secrets_by_name=tls_secrets)
    registry = containerd = None
    try:
        registry = start_registry(tmp_path / "registry", host=cluster.gateway)
        scratch = tmp_path / "scratch"
        scratch.mkdir()
        layout = write_oci_layout(tmp_path / "layouts" / "tools", "v1",
                                  ImageSpec((*busybox_layers(scratch), tools_layer())))
        shutil.rmtree(scratch)
        image = push_layout(layout, registry.address, "afsd-test/tools", "v1").reference

        by_name = {w.name: w for w in workloads(objects)}
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
        cluster.publish("afsd-proxy", [proxy])

        # Every container is live and ready on its probes' real endpoints.
        for pod in (discovery, node, proxy):
            for name in pod.running:
                for kind in ("livenessProbe", "readinessProbe"):
                    if kind in pod.container(name).spec:
                        assert pod.probe(name, kind)[0] == 200, (pod.name, name, kind)

        # Every daemon serves mutual TLS, as the node its certificate names.
        for pod, container in ((discovery, "discovery"), (node, "layerstore"), (node, "afslet"), (proxy, "proxy")):
            assert "mutual TLS as " in pod.running[container].log(), (pod.name, container)
        assert f"mutual TLS as {cluster.node_name} (afsd:nodes)" in node.running["layerstore"].log()

        # afs-sdk's Execute through the proxy pod over TLS, with a user certificate issued by `afsd certs`
        # from the cluster CA; the client dials the Service's name (cluster DNS), which the proxy's
        # certificate names; the proxy places the call on the node pod's afslet by DNS.
        alice = user_certificate(tmp_path / "users", tls_secrets["afsd-ca"], "alice")
        call = ProxySdkCall({"address": "afsd-proxy.afsd.svc.cluster.local:62051", "op": "execute",
                             "extra_entries": [], "tls": alice, "input": {
                                 "image": image,
                                 "command": ["/bin/sh", "-c",
                                             "echo hello from $(hostname) > /root/out.txt; cat /root/out.txt"],
                                 "cpu_cores": 1, "memory_mb": 256, "timeout_ms": 60_000}},
                            prefix=with_resolv_conf(proxy.directory / "resolv.conf")).finish()
        assert call.result["exit_code"] == 0, call.events
        assert call.stdout == [call.stdout[0]] and call.stdout[0].startswith("hello from ")
        assert call.files()["root/out.txt"].startswith(b"hello from ")
        # Without a certificate of the cluster CA, no call.
        refused = ProxySdkCall({"address": "afsd-proxy.afsd.svc.cluster.local:62051", "op": "status",
                                "tls": {"ca": alice["ca"]}},
                               prefix=with_resolv_conf(proxy.directory / "resolv.conf")).finish()
        assert refused.events and refused.events[0].get("status") in ("UNAVAILABLE", "STREAM_TERMINATED",
                                                                       "CONNECTION_REFUSED"), refused.events

        # The bearer-token variant (components/proxy-tokens): a proxy pod whose port asks for no client
        # certificate; its token file comes from a Secret through the pod's fsGroup (root:65534, 0440).
        token = secrets.token_urlsafe(24)
        cluster.secrets["afsd-proxy-tokens"] = {"tokens": f"alice {token}\n".encode()}
        (token_workload,) = [w for w in workloads(with_components(objects, [MANIFESTS / "components" / "proxy-tokens"]))
                             if w.name == "afsd-proxy"]
        token_proxy = cluster.run_pod(token_workload)
        cluster.publish("afsd-proxy", [token_proxy])
        answers = {}
        for who, shown in (("alice", token), ("nobody", "")):
            answers[who] = ProxySdkCall({"address": "afsd-proxy.afsd.svc.cluster.local:62051", "op": "status",
                                         "tls": {"ca": alice["ca"]}, "token": shown},
                                        prefix=with_resolv_conf(proxy.directory / "resolv.conf")).finish().events
        assert answers["alice"][0]["limit_cpu_cores"] == 4, answers
        assert answers["nobody"][0].get("status") == "UNAUTHENTICATED", answers
        assert token_proxy.stop() == {"proxy": 0}

        # containerd on the host (configured as docs/kubernetes.md says) pulls through the node pod's
        # snapshotter, on the socket its hostPath puts on the host: no layer is downloaded, each comes from
        # the node daemon, lazily.
        socket = cluster.host_root / "run/afsd-snapshotter/snapshotter.sock"
        containerd = start_containerd(snapshotter_socket=socket, registry=registry.address, sandbox_image=image)
        assert asyncio.run(cri_pull(containerd, image)).startswith("sha256:")
        snapshotter_metrics = scrape(f"{node.ip}:9104")
        lazy = metric(snapshotter_metrics, "afsd_snapshotter_layers_total", path="lazy")
        assert lazy == 3 and not metric(snapshotter_metrics, "afsd_snapshotter_layers_total", path="fallback")
        containerd.stop()
        assert containerd.leftovers() == []
        containerd = None

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
        assert codes == {"afslet": 0, "snapshotter": 0, "node": 0, "layerstore": 0}
    finally:
        if containerd is not None:
            containerd.stop()
        cluster.close()
        if registry is not None:
            registry.stop()
    assert cluster.leftovers() == []


def user_certificate(directory: Path, cluster_ca: dict[str, bytes], name: str) -> dict[str, str]:
    """`afsd certs issue NAME --user` with the cluster CA of the afsd-ca Secret (as the node pods' init
    container uses it): the afs-sdk client's TLS files."""
    ca = directory / "ca"
    ca.mkdir(parents=True)
    (ca / "ca.crt").write_bytes(cluster_ca["tls.crt"])
    (ca / "ca.key").write_bytes(cluster_ca["tls.key"])
    (ca / "ca.key").chmod(0o600)
    subprocess.run([sys.executable, "-m", "afsd", "certs", "issue", name, "--user", "--dir", str(ca)],
                   check=True, capture_output=True, text=True)
    return {"ca": str(ca / name / "ca.crt"), "cert": str(ca / name / "tls.crt"), "key": str(ca / name / "tls.key")}


async def cri_pull(containerd, image: str) -> str:
    """A kubelet's PullImage (the CRI labels containerd gives the snapshotter come with it)."""
    cri = CriClient(containerd)
    try:
        return await cri.pull(image)
    finally:
        await cri.close()


def wait_for_whole_blobs(mounts, timeout: float = 120.0) -> None:
    """Until every layer of every mount is on the node (the background fill completed)."""
    deadline = time.monotonic() + timeout
    while any(m.get("bytes_cached", 0) != m.get("bytes_total", 0) for m in mounts()):
        assert time.monotonic() < deadline, mounts()
        time.sleep(0.5)
