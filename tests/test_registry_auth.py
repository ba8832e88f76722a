"""Registry authentication against real registries: htpasswd (basic), distribution's token auth with
a token server, Docker config credentials, and credentials never reaching a host they are not for."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Callable
from pathlib import Path

import pytest

from afsd.errors import RegistryAuthError, RegistryError
from afsd.oci.client import RegistryClient
from afsd.oci.config import Credential, RegistryConfig
from afsd.oci.platform import Platform
from afsd.oci.reference import parse_reference
from tests.support.faultproxy import FaultProxy
from tests.support.registries import (
    IDENTITY_TOKEN,
    LabRegistry,
    PushedImage,
    image_of_files,
    layer_blobs,
    pull_image,
    push_image,
)

AMD64 = Platform("linux", "amd64")


def basic(username: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode()


@pytest.fixture(scope="module")
def images(basic_registry: LabRegistry, token_registry: LabRegistry,
           tmp_path_factory: pytest.TempPathFactory) -> dict[str, PushedImage]:
    workdir = tmp_path_factory.mktemp("auth-images")
    spec = image_of_files([{"bin/app": b"app"}, {"etc/app.conf": b"conf"}])
    return {
        "basic": push_image(basic_registry, "auth/app", spec, workdir, tag="v1"),
        "private": push_image(token_registry, "private/app", spec, workdir, tag="v1"),
        "private-other": push_image(token_registry, "private/other", spec, workdir, tag="v1"),
        "public": push_image(token_registry, "public/app", spec, workdir, tag="v1"),
    }


# -- HTTP basic ----------------------------------------------------------------------------------------


async def test_basic_auth_registry_pulls_with_credentials(basic_registry: LabRegistry,
                                                          images: dict[str, PushedImage], tmp_path: Path) -> None:
    pushed = images["basic"]
    resolved = await pull_image(basic_registry.config(), pushed.reference, tmp_path)
    assert resolved.manifest_digest == pushed.digest
    assert (tmp_path / "layer-1").read_bytes() == layer_blobs(pushed)[1].data


async def test_basic_auth_registry_without_credentials_says_how_to_log_in(
        basic_registry: LabRegistry, images: dict[str, PushedImage], tmp_path: Path) -> None:
    with pytest.raises(RegistryAuthError) as caught:
        await pull_image(basic_registry.config(with_credentials=False), images["basic"].reference, tmp_path)
    assert f"registry {basic_registry.address} requires a login" in str(caught.value)
    assert f"--registry-auth {basic_registry.address}=USER:PASSWORD" in str(caught.value)


async def test_basic_auth_wrong_password_names_the_registry(basic_registry: LabRegistry,
                                                            images: dict[str, PushedImage], tmp_path: Path) -> None:
    config = basic_registry.config(credentials={basic_registry.address: Credential("afsd", "wrong")})
    with pytest.raises(RegistryAuthError) as caught:
        await pull_image(config, images["basic"].reference, tmp_path)
    assert f"registry {basic_registry.address} rejected the credentials of user 'afsd'" in str(caught.value)
    assert "wrong" not in str(caught.value)


# -- bearer tokens ---------------------------------------------------------------------------------------


async def test_token_auth_registry_pulls_with_credentials(token_registry: LabRegistry,
                                                          images: dict[str, PushedImage], tmp_path: Path) -> None:
    pushed = images["private"]
    before = len(token_registry.token_server.requests)
    resolved = await pull_image(token_registry.config(), pushed.reference, tmp_path)
    assert resolved.manifest_digest == pushed.digest
    assert (tmp_path / "layer-0").read_bytes() == layer_blobs(pushed)[0].data
    new = token_registry.token_server.requests[before:]
    # One token for the repository served the manifest, the config and both layers.
    assert [(r.method, r.account, r.scopes, r.status) for r in new] == \
        [("GET", "afsd", ("repository:private/app:pull",), 200)]


async def test_token_auth_wrong_password_names_the_registry(token_registry: LabRegistry,
                                                            images: dict[str, PushedImage], tmp_path: Path) -> None:
    config = token_registry.config(credentials={token_registry.address: Credential("afsd", "wrong")})
    with pytest.raises(RegistryAuthError) as caught:
        await pull_image(config, images["private"].reference, tmp_path)
    message = str(caught.value)
    assert f"registry {token_registry.address} rejected the credentials of user 'afsd'" in message
    assert "token server answered HTTP 401" in message


async def test_token_auth_anonymous_pull_of_public_repository(token_registry: LabRegistry,
                                                              images: dict[str, PushedImage], tmp_path: Path) -> None:
    before = len(token_registry.token_server.requests)
    resolved = await pull_image(token_registry.config(with_credentials=False), images["public"].reference, tmp_path)
    assert resolved.manifest_digest == images["public"].digest
    new = token_registry.token_server.requests[before:]
    assert [(r.account, r.sent_credentials) for r in new] == [(None, False)]


async def test_token_auth_anonymous_pull_of_private_repository_is_refused(
        token_registry: LabRegistry, images: dict[str, PushedImage], tmp_path: Path) -> None:
    with pytest.raises(RegistryAuthError) as caught:
        await pull_image(token_registry.config(with_credentials=False), images["private"].reference, tmp_path)
    message = str(caught.value)
    assert f"registry {token_registry.address} refused anonymous access to private/app" in message
    assert f"--registry-auth {token_registry.address}=USER:PASSWORD" in message


async def test_concurrent_requests_share_one_token_request(token_registry: LabRegistry,
                                                           images: dict[str, PushedImage], tmp_path: Path) -> None:
    server = token_registry.token_server
    pushed = images["private"]
    ref = parse_reference(pushed.reference)
    async with RegistryClient(token_registry.config()) as client:
        before = len(server.requests)
        results = await asyncio.gather(*(client.resolve(ref, AMD64) for _ in range(8)))
        assert len(server.requests) - before == 1
        assert {r.manifest_digest for r in results} == {pushed.digest}

        # The cached token serves later requests too, blobs included.
        layers = results[0].layers
        await asyncio.gather(*(client.fetch_blob(ref, layer, tmp_path / f"{i}") for i, layer in enumerate(layers)))
        assert len(server.requests) - before == 1

        # Another repository is another scope: one more token, again shared.
        other = parse_reference(images["private-other"].reference)
        await asyncio.gather(*(client.resolve(other, AMD64) for _ in range(4)))
        assert [r.scopes for r in server.requests[before:]] == [
            ("repository:private/app:pull",), ("repository:private/other:pull",)]


async def test_identity_token_from_docker_config(token_registry: LabRegistry, images: dict[str, PushedImage],
                                                 tmp_path: Path) -> None:
    docker_config = tmp_path / "config.json"
    docker_config.write_text(json.dumps({"auths": {token_registry.address: {"identitytoken": IDENTITY_TOKEN}}}))
    config = token_registry.config(with_credentials=False, docker_config=docker_config)
    before = len(token_registry.token_server.requests)
    resolved = await pull_image(config, images["private"].reference, tmp_path)
    assert resolved.manifest_digest == images["private"].digest
    new = token_registry.token_server.requests[before:]
    # Exchanged with the OAuth2 refresh-token grant, answered with `access_token`.
    assert [(r.method, r.account) for r in new] == [("POST", "afsd")]


async def test_credentials_go_to_a_plain_http_token_server_only_if_it_is_listed(
        token_registry: LabRegistry, images: dict[str, PushedImage], tmp_path: Path) -> None:
    server = token_registry.token_server
    config = token_registry.config(insecure_hosts=frozenset({token_registry.address}))
    before = len(server.requests)
    with pytest.raises(RegistryAuthError) as caught:
        await pull_image(config, images["private"].reference, tmp_path)
    message = str(caught.value)
    assert f"refusing to send the credentials for {token_registry.address} to token server {server.realm}" in message
    assert f"--insecure-registry {server.address}" in message
    assert len(server.requests) == before


# -- Docker config ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("entry", [
    {"auth": base64.b64encode(b"afsd:s3cret").decode()},
    {"username": "afsd", "password": "s3cret"},
])
@pytest.mark.parametrize("key_form", ["{}", "http://{}/v2/", "{}/"])
async def test_docker_config_credentials(basic_registry: LabRegistry, images: dict[str, PushedImage],
                                         tmp_path: Path, entry: dict, key_form: str) -> None:
    docker_config = tmp_path / "config.json"
    docker_config.write_text(json.dumps({"auths": {key_form.format(basic_registry.address): entry}}))
    config = basic_registry.config(with_credentials=False, docker_config=docker_config)
    resolved = await pull_image(config, images["basic"].reference, tmp_path)
    assert resolved.manifest_digest == images["basic"].digest


# -- credentials stay with their host --------------------------------------------------------------------------


async def test_mirror_never_sees_the_origin_credentials(basic_registry: LabRegistry, open_registry: LabRegistry,
                                                        images: dict[str, PushedImage],
                                                        fault_proxy: Callable[..., FaultProxy], tmp_path: Path) -> None:
    mirror = fault_proxy(open_registry.address)  # a mirror that lacks the image
    config = basic_registry.config(insecure_hosts=frozenset({basic_registry.address, mirror.address}),
                                   mirrors={basic_registry.address: [mirror.address]})
    resolved = await pull_image(config, images["basic"].reference, tmp_path)
    assert resolved.manifest_digest == images["basic"].digest
    assert mirror.requests, "the mirror was not tried first"
    assert all("authorization" not in r.headers for r in mirror.requests)


async def test_mirror_gets_its_own_credentials(basic_registry: LabRegistry, images: dict[str, PushedImage],
                                               fault_proxy: Callable[..., FaultProxy], tmp_path: Path,
                                               down_address: str) -> None:
    mirror = fault_proxy(basic_registry.address)  # has the image, wants the basic registry's login
    origin = down_address  # so everything must come from the mirror
    config = RegistryConfig(insecure_hosts=frozenset({origin, mirror.address}), mirrors={origin: [mirror.address]},
                            credentials={origin: Credential("origin-user", "origin-secret"),
                                         mirror.address: Credential("afsd", "s3cret")})
    resolved = await pull_image(config, f"{origin}/auth/app:v1", tmp_path)
    assert resolved.manifest_digest == images["basic"].digest
    sent = {r.headers.get("authorization") for r in mirror.requests}
    assert basic("afsd", "s3cret") in sent
    assert basic("origin-user", "origin-secret") not in sent


def redirecting_registry(basic_registry: LabRegistry,
                         fault_proxy: Callable[..., FaultProxy]) -> tuple[FaultProxy, FaultProxy]:
    """A registry front that sends blob downloads to a separate blob store (as registries backed by
    S3 do); the store authorises by itself, like a pre-signed URL."""
    store = fault_proxy(basic_registry.address, upstream_headers={"Authorization": basic("afsd", "s3cret")})
    front = fault_proxy(basic_registry.address)
    front.redirect("/blobs/", f"http://{store.address}")
    return front, store


async def test_authorization_is_not_forwarded_to_another_origin_on_redirect(
        basic_registry: LabRegistry, images: dict[str, PushedImage], fault_proxy: Callable[..., FaultProxy],
        tmp_path: Path) -> None:
    front, store = redirecting_registry(basic_registry, fault_proxy)
    config = RegistryConfig(insecure_hosts=frozenset({front.address, store.address}),
                            credentials={front.address: Credential("afsd", "s3cret")})
    resolved = await pull_image(config, f"{front.address}/auth/app:v1", tmp_path)
    assert (tmp_path / "layer-0").read_bytes() == layer_blobs(images["basic"])[0].data
    blob_requests = store.requests_to("/blobs/")
    assert len(blob_requests) == 1 + len(resolved.layers)  # config and layers
    assert all("authorization" not in r.headers for r in blob_requests)
    assert all(r.headers.get("authorization") == basic("afsd", "s3cret") for r in front.requests_to("/blobs/"))


async def test_redirect_to_plain_http_host_not_listed_is_refused(
        basic_registry: LabRegistry, images: dict[str, PushedImage], fault_proxy: Callable[..., FaultProxy],
        tmp_path: Path) -> None:
    front, store = redirecting_registry(basic_registry, fault_proxy)
    config = RegistryConfig(insecure_hosts=frozenset({front.address}),
                            credentials={front.address: Credential("afsd", "s3cret")})
    with pytest.raises(RegistryError, match=f"refusing plain HTTP to {store.address}.*--insecure-registry"):
        await pull_image(config, f"{front.address}/auth/app:v1", tmp_path)
    assert store.requests == []
