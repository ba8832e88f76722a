"""Mirrors and retries: pulls survive down or incomplete mirrors, flaky fronts, throttling and dropped
connections; when nothing works, the error says what was tried."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from afsd.errors import AfsdError, NotFoundError, RegistryError, RegistryUnreachableError
from afsd.lab.registry import start_registry
from afsd.oci.client import ResolvedImage
from afsd.oci.config import RegistryConfig
from afsd.oci.platform import Platform
from tests.support.faultproxy import FaultProxy
from tests.support.registries import LabRegistry, PushedImage, image_of_files, layer_blobs, pull_image, push_image

AMD64 = Platform("linux", "amd64")
SPEC = image_of_files([{"bin/app": b"app binary"}, {"usr/share/data": b"data" * 5000}])


@pytest.fixture(scope="module")
def origin(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabRegistry]:
    """A registry of its own, so mirror tests can tell its traffic apart."""
    with start_registry(tmp_path_factory.mktemp("origin-registry")) as process:
        yield LabRegistry(process)


@pytest.fixture(scope="module")
def image(origin: LabRegistry, tmp_path_factory: pytest.TempPathFactory) -> PushedImage:
    return push_image(origin, "resilience/app", SPEC, tmp_path_factory.mktemp("resilience-images"), tag="v1")


def config_for(*hosts: str, **overrides: object) -> RegistryConfig:
    settings: dict = {"insecure_hosts": frozenset(hosts), "backoff_base": 0.01, "max_attempts": 4,
                      "connect_timeout": 5, "read_timeout": 20}
    settings.update(overrides)
    return RegistryConfig(**settings)


def assert_pulled(resolved: ResolvedImage, image: PushedImage, dest: Path) -> None:
    assert resolved.manifest_digest == image.digest
    assert [(dest / f"layer-{i}").read_bytes() for i in range(len(resolved.layers))] == \
        [layer.data for layer in layer_blobs(image)]
    assert not list(dest.glob("*.partial"))


def requests_for(registry: LabRegistry, path: str) -> list[int]:
    """Statuses of the GETs `registry` answered for `path` (e.g. `/v2/repo/manifests/v1`)."""
    return [e.status for e in registry.process.access_log() if e.method == "GET" and e.uri == path]


# -- mirrors ----------------------------------------------------------------------------------------------


async def test_down_mirror_and_mirror_without_the_image_fall_back_to_origin(
        origin: LabRegistry, open_registry: LabRegistry, image: PushedImage, tmp_path: Path, down_address: str) -> None:
    down = down_address
    config = config_for(origin.address, open_registry.address, down,
                        mirrors={origin.address: [down, open_registry.address]})
    resolved = await pull_image(config, image.reference, tmp_path)
    assert_pulled(resolved, image, tmp_path)
    # The second mirror was asked (and said 404) before the origin served the image.
    assert requests_for(open_registry, "/v2/resilience/app/manifests/v1") == [404]
    assert 200 in requests_for(origin, "/v2/resilience/app/manifests/v1")


async def test_mirror_that_has_the_image_spares_the_origin(origin: LabRegistry, image: PushedImage,
                                                           tmp_path_factory: pytest.TempPathFactory,
                                                           tmp_path: Path) -> None:
    with start_registry(tmp_path_factory.mktemp("mirror-registry")) as process:
        mirror = LabRegistry(process)
        push_image(mirror, "resilience/app", SPEC, tmp_path, tag="v1")
        served_by_origin = len(origin.process.access_log())
        served_by_mirror = len(requests_for(mirror, "/v2/resilience/app/manifests/v1"))  # the push checks it too
        config = config_for(origin.address, mirror.address, mirrors={origin.address: [mirror.address]})
        resolved = await pull_image(config, image.reference, tmp_path / "pull")
        assert_pulled(resolved, image, tmp_path / "pull")
        assert len(origin.process.access_log()) == served_by_origin
        assert requests_for(mirror, "/v2/resilience/app/manifests/v1")[served_by_mirror:] == [200]


async def test_mirror_serving_a_corrupt_blob_falls_back_to_origin(
        origin: LabRegistry, image: PushedImage, fault_proxy: Callable[..., FaultProxy], tmp_path: Path) -> None:
    mirror = fault_proxy(origin.address)
    layer = image.manifests[0].layers[1]
    mirror.corrupt(f"/blobs/{layer.digest}")
    config = config_for(origin.address, mirror.address, mirrors={origin.address: [mirror.address]})
    resolved = await pull_image(config, image.reference, tmp_path)
    assert_pulled(resolved, image, tmp_path)
    assert len(mirror.requests_to(f"/blobs/{layer.digest}")) == 1  # not retried there: it moved on


async def test_mirror_failing_with_5xx_falls_back_after_its_retries(
        origin: LabRegistry, image: PushedImage, fault_proxy: Callable[..., FaultProxy], tmp_path: Path) -> None:
    mirror = fault_proxy(origin.address)
    mirror.fail("/manifests/", status=500)
    config = config_for(origin.address, mirror.address, mirrors={origin.address: [mirror.address]})
    resolved = await pull_image(config, image.reference, tmp_path)
    assert_pulled(resolved, image, tmp_path)
    assert len(mirror.requests_to("/manifests/v1")) == 4


async def test_when_everything_fails_the_error_names_origin_and_mirrors(origin: LabRegistry, image: PushedImage,
                                                                        tmp_path: Path, down_address: str) -> None:
    down = down_address
    config = config_for(origin.address, down, mirrors={origin.address: [down]})
    with pytest.raises(NotFoundError) as caught:
        await pull_image(config, f"{origin.address}/resilience/missing:v1", tmp_path)
    message = str(caught.value)
    assert f"image {origin.address}/resilience/missing:v1 not found on {origin.address}" in message
    assert f"mirror {down}: cannot connect to registry {down}" in message


# -- retries ---------------------------------------------------------------------------------------------------


@pytest.fixture
def flaky(origin: LabRegistry, fault_proxy: Callable[..., FaultProxy]) -> FaultProxy:
    return fault_proxy(origin.address)


def via(proxy: FaultProxy, image: PushedImage) -> str:
    return image.reference.replace(image.reference.split("/", 1)[0], proxy.address, 1)


async def test_service_unavailable_twice_then_success(flaky: FaultProxy, image: PushedImage, tmp_path: Path) -> None:
    flaky.fail("/manifests/v1", status=503, times=2)
    resolved = await pull_image(config_for(flaky.address), via(flaky, image), tmp_path)
    assert_pulled(resolved, image, tmp_path)
    assert len(flaky.requests_to("/manifests/v1")) == 3


@pytest.mark.parametrize("status", [400, 403, 404])
async def test_client_errors_are_not_retried(flaky: FaultProxy, image: PushedImage, tmp_path: Path,
                                             status: int) -> None:
    flaky.fail("/manifests/v1", status=status, times=1)
    with pytest.raises(AfsdError):
        await pull_image(config_for(flaky.address), via(flaky, image), tmp_path)
    assert len(flaky.requests_to("/manifests/v1")) == 1  # the shared policy (afsd.retry) never retries a 4xx


async def test_too_many_requests_with_retry_after(flaky: FaultProxy, image: PushedImage, tmp_path: Path) -> None:
    flaky.fail("/blobs/", status=429, times=1, headers={"Retry-After": "0"})
    resolved = await pull_image(config_for(flaky.address), via(flaky, image), tmp_path)
    assert_pulled(resolved, image, tmp_path)


async def test_dropped_connections_are_retried(flaky: FaultProxy, image: PushedImage, tmp_path: Path) -> None:
    flaky.drop("/manifests/v1", times=2)
    resolved = await pull_image(config_for(flaky.address), via(flaky, image), tmp_path)
    assert_pulled(resolved, image, tmp_path)


async def test_blob_cut_off_mid_stream_is_downloaded_again(flaky: FaultProxy, image: PushedImage,
                                                           tmp_path: Path) -> None:
    layer = image.manifests[0].layers[1]
    flaky.truncate(f"/blobs/{layer.digest}", times=1)
    resolved = await pull_image(config_for(flaky.address), via(flaky, image), tmp_path)
    assert_pulled(resolved, image, tmp_path)
    assert len(flaky.requests_to(f"/blobs/{layer.digest}")) == 2


async def test_persistent_server_errors_give_up_with_the_status(flaky: FaultProxy, image: PushedImage,
                                                                tmp_path: Path) -> None:
    flaky.fail("/manifests/", status=503)
    with pytest.raises(RegistryError) as caught:
        await pull_image(config_for(flaky.address, max_attempts=3), via(flaky, image), tmp_path)
    message = str(caught.value)
    assert f"registry {flaky.address} answered HTTP 503 Service Unavailable" in message
    assert "gave up after 3 attempts" in message
    assert len(flaky.requests_to("/manifests/")) == 3


async def test_persistently_dropped_connections_give_up(flaky: FaultProxy, image: PushedImage,
                                                        tmp_path: Path) -> None:
    flaky.drop("/manifests/")
    with pytest.raises(RegistryUnreachableError, match=f"connection to registry {flaky.address} failed.*gave up"):
        await pull_image(config_for(flaky.address, max_attempts=2), via(flaky, image), tmp_path)
