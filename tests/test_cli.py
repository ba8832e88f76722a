"""The `afsd` command line as a user runs it: help everywhere, and bad input answered with one clear
line on stderr, a non-zero exit code and no traceback."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from afsd.lab.skopeo import PushedImage
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
