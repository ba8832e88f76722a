"""Pytest fixtures: real `docker-registry` processes (anonymous, htpasswd, token auth), a fault proxy,
and helpers that push small images into them and pull them back with afsd's registry client.

Fixtures (registries are session-scoped; each stops its processes at the end):
- `open_registry`: anonymous access.
- `basic_registry`: htpasswd auth, user `afsd` / password `s3cret`.
- `token_registry`: distribution `auth.token` backed by `tests.support.tokenserver.TokenServer`
  (same user; identity token `afsd-identity-token` for user afsd; `public/*` pullable anonymously).
- `fault_proxy`: a factory, `fault_proxy("127.0.0.1:PORT")` starts a `FaultProxy` in front of a
  registry; stopped after the test.

Each registry fixture yields a `LabRegistry`: `.address` (`127.0.0.1:PORT`), `.username` /
`.password`, `.creds` (`user:pass` for skopeo, or None), `.push(layout, repository, tag)` (skopeo,
via `afsd.lab.skopeo.push_layout`), `.config()` (a `RegistryConfig` that can pull from it) and
`.token_server` for the token registry.

Images are built and pushed by `afsd.lab` (`image_of_files` + `push_image` for small ones); only
`put_image_raw` talks to the registry API itself, for manifests skopeo would not push.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from afsd.lab.facts import ImageFacts
from afsd.lab.layers import NS_PER_SECOND, Entry, LayerSpec, sha256_digest
from afsd.lab.oci_layout import ImageSpec, LayoutImage, write_oci_layout
from afsd.lab.ports import reserve_port
from afsd.lab.registry import HtpasswdAuth, RegistryProcess, start_registry
from afsd.lab.skopeo import MediaTypes, PushedImage, push_layout
from afsd.oci.client import RegistryClient, ResolvedImage
from afsd.oci.config import Credential, RegistryConfig
from afsd.oci.platform import Platform
from afsd.oci.reference import parse_reference
from tests.support.faultproxy import FaultProxy
from tests.support.tokenserver import TokenServer

USERNAME = "afsd"
PASSWORD = "s3cret"
IDENTITY_TOKEN = "afsd-identity-token"
AMD64 = Platform("linux", "amd64")


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

    def push(self, layout: LayoutImage, repository: str, tag: str | None = None, *,
             media_types: MediaTypes = "oci", facts: Mapping[Platform, ImageFacts] | None = None) -> PushedImage:
        """`afsd.lab.skopeo.push_layout` to this registry, logged in as this registry's user."""
        return push_layout(layout, self.address, repository, tag, media_types=media_types, creds=self.creds,
                           facts=facts)

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


# -- small images for the registry-client tests ----------------------------------------------------

FILE_MTIME_NS = 1_600_000_000 * NS_PER_SECOND


def image_of_files(layers: Sequence[Mapping[str, bytes]], platform: Platform = AMD64, *,
                   entrypoint: Sequence[str] = ("/bin/hello",), cmd: Sequence[str] = ("--greet", "world"),
                   env: Sequence[str] = ("PATH=/usr/bin:/bin", "GREETING=hi"), working_dir: str = "/srv",
                   user: str = "1000:1000") -> ImageSpec:
    """A small image: one gzip layer per `{path: content}` mapping (mode 0755, parent directories
    implied), with a runtime config the tests can recognise."""
    return ImageSpec(
        tuple(LayerSpec(tuple(Entry.file(path, content, mode=0o755, mtime_ns=FILE_MTIME_NS)
                              for path, content in sorted(files.items())), "gzip", add_parents=False)
              for files in layers),
        platform, cmd=tuple(cmd), env=tuple(env), entrypoint=tuple(entrypoint), working_dir=working_dir,
        user=user)


def push_image(registry: LabRegistry, repository: str, images: ImageSpec | Sequence[ImageSpec], workdir: Path, *,
               tag: str = "latest", media_types: MediaTypes = "oci") -> PushedImage:
    """Write `images` (one image, or an index of several) into the OCI layout `workdir/layout` and push
    them to `registry` as `repository:tag` with skopeo (`media_types="docker"`: Docker schema 2)."""
    layout = write_oci_layout(workdir / "layout", f"{repository.replace('/', '-')}-{tag}", images)
    return registry.push(layout, repository, tag, media_types=media_types)


@dataclass(frozen=True)
class Blob:
    """A blob held in memory, for manifests written by hand (`put_image_raw`)."""

    media_type: str
    data: bytes

    @property
    def digest(self) -> str:
        return sha256_digest(self.data)

    @property
    def size(self) -> int:
        return len(self.data)

    def descriptor(self, **extra: object) -> dict:
        return {"mediaType": self.media_type, "digest": self.digest, "size": self.size, **extra}


def layer_blobs(image: PushedImage, manifest_index: int = 0) -> list[Blob]:
    """The layers of one of `image.manifests`, bottom first: media types as the registry serves them,
    bytes from the layout they were pushed from (skopeo never changes a layer's bytes)."""
    return [Blob(layer.media_type, image.layout.read_blob(layer.digest))
            for layer in image.manifests[manifest_index].layers]


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
                     platform: Platform = AMD64) -> ResolvedImage:
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
def down_address() -> Iterator[str]:
    """`127.0.0.1:PORT` where nothing listens (connections are refused), held for the test so that no
    other process can start listening there meanwhile."""
    with reserve_port() as reservation:
        yield reservation.address


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
