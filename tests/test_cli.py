"""The `afsd` command line as a user runs it: help everywhere, and bad input answered with one clear
line on stderr, a non-zero exit code and no traceback."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import grpc
import pytest

from afsd.api import discovery_pb2 as dpb
from afsd.api import discovery_pb2_grpc as dgrpc
from afsd.lab import deadlines
from afsd.lab.skopeo import PushedImage
from afsd.readiness import read_ready
from tests.support.registries import LabRegistry

SUBCOMMANDS = ["convert", "discovery", "layerstore", "demo", "proxy", "let", "node", "mount", "umount", "mounts", "run",
               "ps", "logs", "stop", "snapshotter", "certs"]


def afsd(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "afsd", *args], capture_output=True, text=True, timeout=timeout)


def assert_one_clear_line(result: subprocess.CompletedProcess[str], *fragments: str) -> None:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.mark.parametrize("subcommand", [None, *SUBCOMMANDS])
def test_every_subcommand_has_help(subcommand: str | None) -> None:
    result = afsd(*([subcommand] if subcommand else []), "--help")
    assert result.returncode == 0
    assert "usage: afsd" in result.stdout


def test_convert_writes_blobs_and_a_description(features_image: PushedImage, open_registry: LabRegistry,
                                                tmp_path: Path) -> None:
    result = afsd("convert", "--insecure-registry", open_registry.address, features_image.reference,
                  str(tmp_path / "out"), "--json")
    assert result.returncode == 0, result.stderr
    description = json.loads(result.stdout)
    assert description == json.loads((tmp_path / "out" / "image.json").read_text())
    layers = description["layers"]
    assert [layer["digest"] for layer in layers] == [l.digest for l in features_image.manifests[0].layers]
    for layer in layers:
        blob = tmp_path / "out" / layer["file"]
        assert blob.stat().st_size == layer["blob"]["size"]


def test_convert_shows_each_layers_progress_in_plain_lines_when_not_on_a_terminal(
        features_image: PushedImage, open_registry: LabRegistry, tmp_path: Path) -> None:
    result = afsd("convert", "--insecure-registry", open_registry.address, features_image.reference,
                  str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    assert "\x1b" not in result.stderr          # no terminal: no cursor movement
    for layer in features_image.manifests[0].layers:
        lines = [line for line in result.stderr.splitlines() if line.strip().startswith(layer.digest[:19])]
        stages = [line.split()[1] for line in lines]
        assert stages[0] == "downloading" and "unpacking" in stages and stages[-1] == "converted", lines
        assert f"downloading 0.0 of {layer.size / 1e6:.1f} MB (0%)" in lines[0], lines[0]


@pytest.mark.parametrize("reference, fragments", [
    ("Alpine:latest", ["invalid image reference", "'Alpine'"]),
    ("alpine:bad tag", ["whitespace"]),
    ("alpine@sha256:1234", ["invalid digest", "64 hex digits"]),
    ("", ["empty image reference"]),
])
def test_convert_rejects_malformed_references(reference: str, fragments: list[str], tmp_path: Path) -> None:
    assert_one_clear_line(afsd("convert", reference, str(tmp_path)), *fragments)


def test_convert_names_an_unknown_tag(open_registry: LabRegistry, features_image: PushedImage, tmp_path: Path) -> None:
    missing = features_image.reference.rsplit(":", 1)[0] + ":no-such-tag"
    assert_one_clear_line(afsd("convert", "--insecure-registry", open_registry.address, missing, str(tmp_path)),
                          "no-such-tag")


def test_convert_lists_the_platforms_an_index_has(open_registry: LabRegistry, multiarch_image: PushedImage,
                                                  tmp_path: Path) -> None:
    result = afsd("convert", "--insecure-registry", open_registry.address, "--platform", "linux/s390x",
                  multiarch_image.reference, str(tmp_path))
    assert_one_clear_line(result, "linux/s390x", "linux/arm64")


def test_convert_names_an_unreachable_registry(tmp_path: Path) -> None:
    result = afsd("convert", "--insecure-registry", "127.0.0.1:9", "127.0.0.1:9/app:1", str(tmp_path))
    assert_one_clear_line(result, "127.0.0.1:9")


def test_convert_names_the_registry_that_refused_the_password(basic_registry: LabRegistry,
                                                              features_image: PushedImage, tmp_path: Path) -> None:
    reference = f"{basic_registry.address}/lab/nothing:1"
    result = afsd("convert", "--insecure-registry", basic_registry.address,
                  "--registry-auth", f"{basic_registry.address}=afsd:wrong-password", reference, str(tmp_path))
    assert_one_clear_line(result, basic_registry.address)


def test_daemons_refuse_unusable_options(tmp_path: Path) -> None:
    assert_one_clear_line(afsd("layerstore", "--listen", "0.0.0.0:7000", "--node-id", "n", "--cache-dir", str(tmp_path)),
                          "--listen", "--advertise")
    assert_one_clear_line(afsd("layerstore", "--listen", "localhost:7000", "--node-id", "n", "--cache-dir", str(tmp_path)),
                          "literal IP:PORT")
    assert_one_clear_line(afsd("discovery", "--listen", "127.0.0.1:1", "--ttl", "0"), "--ttl")


def test_afslet_refuses_unusable_sandbox_options(tmp_path: Path) -> None:
    base = ["let", "--listen", "127.0.0.1:1", "--discovery-addr", "127.0.0.1:2", "--work-dir", str(tmp_path / "w")]
    assert_one_clear_line(afsd(*base, "--bind", f"{tmp_path}/missing:/data"), "--bind", "is not a directory")
    assert_one_clear_line(afsd(*base, "--bind", f"{tmp_path}:data"), "--bind", "absolute DST")
    assert_one_clear_line(afsd(*base, "--userns", "--userns-range", "0:10"), "--userns-range", "> 0")
    assert_one_clear_line(afsd(*base, "--bridge-subnet", "10.1.2.0/33"), "--bridge-subnet", "not an IPv4 network")
    assert_one_clear_line(afsd(*base, "--first-frame-timeout", "0"), "--first-frame-timeout")
    assert_one_clear_line(afsd(*base, "--max-extra-bytes", "-1"), "--max-extra-bytes")
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    assert_one_clear_line(afsd(*base[:-1], str(private / "w"), "--userns"), "--userns", "0711")


def _serve(tmp_path: Path, name: str, *args: str) -> tuple[subprocess.Popen, dict]:
    """`afsd ARGS --ready-file ...` started as a service manager would; its ready file once it serves."""
    ready_file = tmp_path / f"{name}.ready.json"
    with open(tmp_path / f"{name}.log", "wb") as log:
        process = subprocess.Popen([sys.executable, "-m", "afsd", *args, "--ready-file", str(ready_file)],
                                   stdout=subprocess.DEVNULL, stderr=log)
    deadline = time.monotonic() + deadlines.DAEMON_START
    while (ready := read_ready(ready_file)) is None:
        assert process.poll() is None, (tmp_path / f"{name}.log").read_text()
        assert time.monotonic() < deadline, f"{name} wrote no ready file"
        time.sleep(0.05)
    assert ready["pid"] == process.pid
    return process, ready


def test_daemons_listen_on_port_0_and_say_where_once_they_serve(tmp_path: Path) -> None:
    started = []
    try:
        discovery, at_discovery = _serve(tmp_path, "discovery", "discovery", "--listen", "127.0.0.1:0",
                                         "--metrics-listen", "127.0.0.1:0")
        started.append(discovery)
        layerstore, at_layerstore = _serve(tmp_path, "layerstore", "layerstore", "--listen", "127.0.0.1:0",
                                           "--node-id", "n0", "--cache-dir", str(tmp_path / "cache"),
                                           "--admin-socket", str(tmp_path / "admin.sock"), "--heartbeat-period", "1",
                                           "--discovery-endpoint", at_discovery["listen"])
        started.append(layerstore)
        proxy, at_proxy = _serve(tmp_path, "proxy", "proxy", "--listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0",
                                 "--afslet-target", "localhost:9")
        started.append(proxy)
        for ready in (at_discovery, at_layerstore, at_proxy):
            assert not ready["listen"].endswith(":0"), ready
        assert at_layerstore["advertised"] == at_layerstore["listen"]   # what peers are told to dial
        with grpc.insecure_channel(at_discovery["listen"]) as channel:   # the layerstore found it, and is listed
            stub = dgrpc.ServiceDiscoveryStub(channel)
            deadline = time.monotonic() + deadlines.scaled(30)
            while [s.endpoint for s in stub.FindProvider(dpb.FindProviderRequest(), timeout=10).services] != \
                    [at_layerstore["listen"]]:
                assert time.monotonic() < deadline, "no heartbeat from the layerstore"
                time.sleep(0.2)
        with urllib.request.urlopen(f"http://{at_discovery['metrics']}/metrics", timeout=30) as response:
            assert b"afsd_rpc_requests_total" in response.read()
        with urllib.request.urlopen(f"http://{at_proxy['http']}/status", timeout=30) as response:
            assert json.loads(response.read())["node_id"]
    finally:
        for process in started:
            process.send_signal(signal.SIGTERM)
        codes = [process.wait(timeout=deadlines.DAEMON_STOP) for process in started]
    assert codes == [0] * len(started)


def test_convert_rejects_a_corrupted_blob_and_writes_nothing(open_registry: LabRegistry, features_image: PushedImage,
                                                             fault_proxy, tmp_path: Path) -> None:
    proxy = fault_proxy(open_registry.address)
    layer = features_image.manifests[0].layers[-1]
    proxy.corrupt(f"/blobs/{layer.digest}")
    reference = features_image.reference.replace(open_registry.address, proxy.address, 1)
    out = tmp_path / "out"
    result = afsd("convert", "--insecure-registry", proxy.address, reference, str(out))
    assert result.returncode != 0 and "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]       # after the per-layer progress lines
    assert layer.digest in last and "does not match its digest" in last, last
    blobs = list(out.glob("*.erofs"))
    assert len(blobs) < len(features_image.manifests[0].layers), blobs          # the bad layer: not converted
    assert not (out / "image.json").exists()                                   # no image described
    assert not [path for path in out.rglob("*") if path.is_file() and path.suffix not in (".erofs", ".json")]
