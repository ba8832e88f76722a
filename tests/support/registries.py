"""Pytest fixtures: real `docker-registry` processes (anonymous, htpasswd, token auth), a fault proxy,
and helpers that build small OCI images in Python, push them with skopeo and pull them back.

Fixtures (registries are session-scoped; each stops its processes at the end):
- `open_registry`: anonymous access.
- `basic_registry`: htpasswd auth, user `afsd` / password `s3cret`.
- `token_registry`: distribution `auth.token` backed by `tests.support.tokenserver.TokenServer`
  (same user; identity token `afsd-identity-token` for user afsd; `public/*` pullable anonymously).
- `fault_proxy`: a factory, `fault_proxy("127.0.0.1:PORT")` starts a `FaultProxy` in front of a
  registry; stopped after the test.

Each registry fixture yields a `LabRegistry`: `.address` (`127.0.0.1:PORT`), `.username` /
`.password`, `.creds` (`user:pass` for `skopeo --dest-creds`, or None), `.skopeo_dest_args()`,
`.config()` (a `RegistryConfig` that can pull from it) and `.token_server` for the token registry.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import shutil
import subprocess
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from afsd.lab.registry import HtpasswdAuth, RegistryProcess, start_registry
from afsd.oci import mediatypes
from afsd.oci.client import RegistryClient, ResolvedImage
from afsd.oci.config import Credential, RegistryConfig
from afsd.oci.platform import Platform
from afsd.oci.reference import parse_reference
from tests.support.faultproxy import FaultProxy
from tests.support.tokenserver import TokenServer

USERNAME = "afsd"
PASSWORD = "s3cret"
IDENTITY_TOKEN = "afsd-identity-token"


@dataclass
class LabRegistry:
    """A running registry as tests see it: where it is and how to log in."""

    process: RegistryProcess
    username: str = ""
    password: str = ""
    token_server: TokenServer | None = None

    @property
    def address(self) -> str:
        return self.process.address

    @property
    def creds(self) -> str | None:
        """`user:pass` for `skopeo --dest-creds`, or None for an anonymous registry."""
        return f"{self.username}:{self.password}" if self.username else None

    def skopeo_dest_args(self) -> list[str]:
        args = ["--dest-tls-verify=false"]
        if self.creds:
            args += ["--dest-creds", self.creds]
        return args

    @property
    def insecure_hosts(self) -> frozenset[str]:
        """The registry, and its token server if any: everything here is plain HTTP on loopback."""
        hosts = {self.address}
        if self.token_server is not None:
            hosts.add(self.token_server.address)
        return frozenset(hosts)

    def credential(self) -> Credential | None:
        return Credential(self.username, self.password) if self.username else None

    def config(self, *, with_credentials: bool = True, **overrides: object) -> RegistryConfig:
        """A RegistryConfig that may pull from this registry (fast retries, for tests)."""
        credential = self.credential()
        settings: dict = {
            "insecure_hosts": self.insecure_hosts,
            "credentials": {self.address: credential} if credential and with_credentials else {},
            "max_attempts": 4,
            "backoff_base": 0.01,
            "connect_timeout": 5,
            "read_timeout": 20,
        }
        settings.update(overrides)
        return RegistryConfig(**settings)


# -- building and pushing images ---------------------------------------------------------------


@dataclass(frozen=True)
class Blob:
    media_type: str
    data: bytes

    @property
    def digest(self) -> str:
        return "sha256:" + hashlib.sha256(self.data).hexdigest()

    @property
    def size(self) -> int:
        return len(self.data)

    def descriptor(self, **extra: object) -> dict:
        return {"mediaType": self.media_type, "digest": self.digest, "size": self.size, **extra}


@dataclass
class ImageSpec:
    """A small image: one layer per dict of `path -> content`, and its runtime config."""

    layers: list[dict[str, bytes]]
    platform: Platform = Platform("linux", "amd64")
    entrypoint: list[str] = field(default_factory=lambda: ["/bin/hello"])
    cmd: list[str] = field(default_factory=lambda: ["--greet", "world"])
    env: list[str] = field(default_factory=lambda: ["PATH=/usr/bin:/bin", "GREETING=hi"])
    working_dir: str = "/srv"
    user: str = "1000:1000"


@dataclass(frozen=True)
class BuiltImage:
    """What went into one platform's image: layer blobs (bottom to top) and the config."""

    spec: ImageSpec
    layers: list[Blob]
    diff_ids: list[str]
    config: Blob
    manifest: Blob


@dataclass(frozen=True)
class PushedImage:
    reference: str  # `address/repository:tag`
    digest: str  # digest of what the registry now serves for the tag (index or manifest)
    images: list[BuiltImage]


def layer_tar(files: dict[str, bytes]) -> bytes:
    """An uncompressed, reproducible tar of `files` (parent directories implied)."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for path, content in sorted(files.items()):
            info = tarfile.TarInfo(path)
            info.size, info.mode, info.mtime = len(content), 0o755, 1_600_000_000
            tar.addfile(info, io.BytesIO(content))
    return out.getvalue()


def build_image(spec: ImageSpec) -> BuiltImage:
    tars = [layer_tar(files) for files in spec.layers]
    layers = [Blob("application/vnd.oci.image.layer.v1.tar+gzip", gzip.compress(t, mtime=0)) for t in tars]
    diff_ids = ["sha256:" + hashlib.sha256(t).hexdigest() for t in tars]
    config = {
        "architecture": spec.platform.architecture, "os": spec.platform.os,
        **({"variant": spec.platform.variant} if spec.platform.variant else {}),
        "config": {"Entrypoint": spec.entrypoint, "Cmd": spec.cmd, "Env": spec.env,
                   "WorkingDir": spec.working_dir, "User": spec.user},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    }
    config_blob = Blob(mediatypes.OCI_CONFIG, json.dumps(config, sort_keys=True).encode())
    manifest = {"schemaVersion": 2, "mediaType": mediatypes.OCI_MANIFEST, "config": config_blob.descriptor(),
                "layers": [layer.descriptor() for layer in layers]}
    return BuiltImage(spec, layers, diff_ids, config_blob,
                      Blob(mediatypes.OCI_MANIFEST, json.dumps(manifest, sort_keys=True).encode()))


def _platform_json(platform: Platform) -> dict:
    result = {"os": platform.os, "architecture": platform.architecture}
    return {**result, "variant": platform.variant} if platform.variant else result


def write_oci_layout(directory: Path, images: list[BuiltImage], tag: str, *, as_index: bool) -> None:
    """An OCI image layout whose `tag` names one manifest, or an index of all `images`."""
    blobs_dir = directory / "blobs" / "sha256"
    blobs_dir.mkdir(parents=True, exist_ok=True)
    blobs = [b for image in images for b in (*image.layers, image.config, image.manifest)]
    if as_index:
        index = {"schemaVersion": 2, "mediaType": mediatypes.OCI_INDEX,
                 "manifests": [image.manifest.descriptor(platform=_platform_json(image.spec.platform))
                               for image in images]}
        top = Blob(mediatypes.OCI_INDEX, json.dumps(index, sort_keys=True).encode())
        blobs.append(top)
    else:
        (top,) = (image.manifest for image in images)
    for blob in blobs:
        (blobs_dir / blob.digest.split(":", 1)[1]).write_bytes(blob.data)
    (directory / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))
    ref_index = {"schemaVersion": 2, "manifests": [
        top.descriptor(annotations={"org.opencontainers.image.ref.name": tag})]}
    (directory / "index.json").write_text(json.dumps(ref_index))


def push_image(registry: LabRegistry, repository: str, specs: list[ImageSpec], workdir: Path, *,
               tag: str = "latest", as_index: bool | None = None, docker_format: bool = False) -> PushedImage:
    """Build the images, write an OCI layout under `workdir` and `skopeo copy` it to the registry.

    Several specs (or `as_index=True`) make an index; `docker_format` converts to Docker schema 2
    (manifest list for an index).
    """
    images = [build_image(spec) for spec in specs]
    as_index = len(specs) > 1 if as_index is None else as_index
    layout = workdir / f"layout-{repository.replace('/', '_')}-{tag}"
    shutil.rmtree(layout, ignore_errors=True)
    write_oci_layout(layout, images, tag, as_index=as_index)
    digest_file = workdir / f"digest-{repository.replace('/', '_')}-{tag}"
    command = ["skopeo", "copy", "--quiet", "--digestfile", str(digest_file), *registry.skopeo_dest_args()]
    if as_index:
        command.append("--all")
    if docker_format:
        command += ["--format", "v2s2"]
    reference = f"{registry.address}/{repository}:{tag}"
    command += [f"oci:{layout}:{tag}", f"docker://{reference}"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    if result.returncode != 0:
        raise RuntimeError(f"skopeo copy to {reference} failed: {result.stderr.strip()}")
    return PushedImage(reference, digest_file.read_text().strip(), images)


def put_image_raw(registry: LabRegistry, repository: str, tag: str, blobs: list[Blob],
                  manifest: bytes, media_type: str) -> str:
    """Push blobs and a hand-written manifest straight through the registry API (anonymous or basic
    auth), for shapes skopeo will not produce; returns the manifest digest."""
    auth = (registry.username, registry.password) if registry.username else None
    with httpx.Client(base_url=f"http://{registry.address}", auth=auth, timeout=30) as http:
        for blob in blobs:
            # Start an upload session, then finish it with the whole blob in one PUT.
            started = http.post(f"/v2/{repository}/blobs/uploads/")
            started.raise_for_status()
            upload = httpx.URL(started.headers["Location"]).copy_merge_params({"digest": blob.digest})
            response = http.put(upload, content=blob.data,
                                headers={"Content-Type": "application/octet-stream"})
            response.raise_for_status()
        response = http.put(f"/v2/{repository}/manifests/{tag}", content=manifest,
                            headers={"Content-Type": media_type})
        response.raise_for_status()
        return response.headers["Docker-Content-Digest"]


async def pull_image(config: RegistryConfig, reference: str, dest: Path,
                     platform: Platform = Platform("linux", "amd64")) -> ResolvedImage:
    """Resolve `reference` and download every layer to `dest/layer-N`, as the converter would."""
    async with RegistryClient(config) as client:
        resolved = await client.resolve(parse_reference(reference), platform)
        for index, layer in enumerate(resolved.layers):
            await client.fetch_blob(resolved.reference, layer, dest / f"layer-{index}")
    return resolved


# -- fixtures --------------------------------------------------------------------------------------


def _htpasswd(path: Path, username: str, password: str) -> Path:
    line = subprocess.run(["htpasswd", "-Bbn", username, password], check=True, capture_output=True,
                          text=True).stdout.strip()
    path.write_text(line + "\n")
    return path


@pytest.fixture
def fault_proxy() -> Iterator[Callable[..., FaultProxy]]:
    """A factory: `fault_proxy(upstream_address, **kw)` starts a FaultProxy, stopped after the test."""
    started: list[FaultProxy] = []

    def start(upstream: str, **kwargs: object) -> FaultProxy:
        proxy = FaultProxy(upstream, **kwargs).start()  # type: ignore[arg-type]
        started.append(proxy)
        return proxy

    yield start
    for proxy in started:
        proxy.stop()


@pytest.fixture(scope="session")
def open_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabRegistry]:
    with start_registry(tmp_path_factory.mktemp("open-registry")) as process:
        yield LabRegistry(process)


@pytest.fixture(scope="session")
def basic_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabRegistry]:
    root = tmp_path_factory.mktemp("basic-registry")
    auth = HtpasswdAuth(_htpasswd(root / "htpasswd", USERNAME, PASSWORD))
    with start_registry(root, auth=auth) as process:
        yield LabRegistry(process, USERNAME, PASSWORD)


@pytest.fixture(scope="session")
def token_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabRegistry]:
    root = tmp_path_factory.mktemp("token-registry")
    # A small delay keeps concurrent token requests overlapping, so single-flight is really tested.
    with TokenServer(root / "token-server", users={USERNAME: PASSWORD},
                     refresh_tokens={IDENTITY_TOKEN: USERNAME}, delay=0.05) as token_server:
        with start_registry(root, auth=token_server.token_auth()) as process:
            yield LabRegistry(process, USERNAME, PASSWORD, token_server)
