"""Registry access settings from command-line options and Docker config files, and the small pieces of
protocol logic (WWW-Authenticate, token lifetimes, Retry-After) that need no registry to check."""

from __future__ import annotations

import base64
import email.utils
import json
from pathlib import Path

import pytest

from afsd.errors import AfsdError, InvalidReferenceError
from afsd.oci._retry import MAX_RETRY_AFTER, retry_after_seconds
from afsd.oci.auth import Challenge, TokenCache, parse_www_authenticate
from afsd.oci.config import Credential, RegistryConfig


def from_options(**options: object) -> RegistryConfig:
    settings: dict = {"insecure": [], "mirrors": [], "auth": [], "docker_config": None}
    settings.update(options)
    return RegistryConfig.from_options(**settings)


@pytest.fixture(autouse=True)
def no_ambient_docker_config(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Keep the machine's own ~/.docker/config.json out of these tests."""
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "no-docker-config"))


def test_options_become_settings() -> None:
    config = from_options(insecure=["127.0.0.1:5000", "Registry.Local"],
                          mirrors=["docker.io=127.0.0.1:5001,mirror.example.com", "index.docker.io=127.0.0.1:5002",
                                   "ghcr.io=127.0.0.1:5003"],
                          auth=["127.0.0.1:5000=afsd:pa:ss:word"])
    assert config.insecure_hosts == frozenset({"127.0.0.1:5000", "registry.local"})
    assert config.mirrors_for("docker.io") == ["127.0.0.1:5001", "mirror.example.com", "127.0.0.1:5002"]
    assert config.mirrors_for("registry-1.docker.io") == config.mirrors_for("docker.io")
    assert config.mirrors_for("ghcr.io") == ["127.0.0.1:5003"]
    assert config.mirrors_for("quay.io") == []
    assert config.credential_for("127.0.0.1:5000") == Credential("afsd", "pa:ss:word")
    assert config.docker_config is None


def test_insecure_host_without_port_covers_every_port() -> None:
    config = RegistryConfig(insecure_hosts=frozenset({"localhost", "127.0.0.1:5000"}))
    assert config.is_insecure("localhost:5000") and config.is_insecure("localhost")
    assert config.is_insecure("127.0.0.1:5000")
    assert not config.is_insecure("127.0.0.1:5001")
    assert not config.is_insecure("registry.example.com")


@pytest.mark.parametrize("options, complaint", [
    ({"mirrors": ["docker.io"]}, "expected REGISTRY=MIRROR"),
    ({"mirrors": ["docker.io="]}, "expected REGISTRY=MIRROR"),
    ({"mirrors": ["docker.io=http://127.0.0.1:5001"]}, "without scheme or path"),
    ({"mirrors": ["docker.io=127.0.0.1:5001/path"]}, "without scheme or path"),
    ({"insecure": ["https://registry.local"]}, "invalid --insecure-registry host"),
    ({"auth": ["127.0.0.1:5000=afsd"]}, "expected HOST=USER:PASSWORD"),
    ({"auth": ["127.0.0.1:5000"]}, "expected HOST=USER:PASSWORD"),
    ({"auth": ["127.0.0.1:5000=:secret"]}, "expected HOST=USER:PASSWORD"),
    ({"auth": ["not a host=afsd:secret"]}, "invalid --registry-auth host"),
])
def test_malformed_options_are_one_line_errors(options: dict, complaint: str) -> None:
    with pytest.raises(InvalidReferenceError) as caught:
        from_options(**options)
    assert complaint in str(caught.value)
    assert "\n" not in str(caught.value)
    assert "secret" not in str(caught.value)


def test_missing_docker_config_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(AfsdError, match=r"Docker config .*nope.json does not exist \(check --docker-config\)"):
        from_options(docker_config=str(tmp_path / "nope.json"))


def write_docker_config(path: Path, auths: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"auths": auths, "credsStore": "desktop"}))
    return path


def test_default_docker_config_follows_docker_config_variable(monkeypatch: pytest.MonkeyPatch,
                                                             tmp_path: Path) -> None:
    path = write_docker_config(tmp_path / "dockercfg" / "config.json", {"quay.io": {"username": "u", "password": "p"}})
    monkeypatch.setenv("DOCKER_CONFIG", str(path.parent))
    config = from_options()
    assert config.docker_config == path
    assert config.credential_for("quay.io") == Credential("u", "p")


def test_default_docker_config_is_home_docker_config(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("DOCKER_CONFIG")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert from_options().docker_config is None  # absent: no file read
    path = write_docker_config(tmp_path / ".docker" / "config.json", {})
    assert from_options().docker_config == path


def test_docker_config_entries_by_exact_host(tmp_path: Path) -> None:
    auth = base64.b64encode(b"hubuser:hubpass").decode()
    path = write_docker_config(tmp_path / "config.json", {
        "https://index.docker.io/v1/": {"auth": auth},
        "http://127.0.0.1:5000/v2/": {"username": "local", "password": "pw"},
        "ghcr.io": {"identitytoken": "refresh-me"},
        "empty.example.com": {},
    })
    config = RegistryConfig(docker_config=path, credentials={"127.0.0.1:5001": Credential("explicit", "x")})
    for hub in ("docker.io", "registry-1.docker.io", "index.docker.io"):
        assert config.credential_for(hub) == Credential("hubuser", "hubpass")
    assert config.credential_for("127.0.0.1:5000") == Credential("local", "pw")
    assert config.credential_for("127.0.0.1:5001") == Credential("explicit", "x")
    assert config.credential_for("127.0.0.1") is None  # another host: nothing
    assert config.credential_for("127.0.0.1:5002") is None
    assert config.credential_for("ghcr.io") == Credential(token="refresh-me")
    assert config.credential_for("empty.example.com") is None


def test_explicit_credentials_win_over_docker_config(tmp_path: Path) -> None:
    path = write_docker_config(tmp_path / "config.json", {"quay.io": {"username": "file", "password": "f"}})
    config = RegistryConfig(docker_config=path, credentials={"quay.io": Credential("option", "o")})
    assert config.credential_for("quay.io") == Credential("option", "o")


@pytest.mark.parametrize("content, complaint", [
    ("{not json", "cannot read Docker config"),
    (json.dumps({"auths": {"quay.io": {"auth": "%%%"}}}), "'auth' of 'quay.io' is not base64 of user:password"),
    (json.dumps({"auths": {"quay.io": {"auth": base64.b64encode(b"nocolon").decode()}}}),
     "not base64 of user:password"),
    (json.dumps({"auths": ["quay.io"]}), "'auths' must be an object"),
])
def test_broken_docker_config_names_the_file(tmp_path: Path, content: str, complaint: str) -> None:
    path = tmp_path / "config.json"
    path.write_text(content)
    with pytest.raises(AfsdError) as caught:
        RegistryConfig(docker_config=path).credential_for("quay.io")
    assert str(path) in str(caught.value) and complaint in str(caught.value)


def test_credential_repr_hides_secrets() -> None:
    text = repr(Credential("afsd", "s3cret", "tok3n"))
    assert "afsd" in text and "s3cret" not in text and "tok3n" not in text


# -- protocol details ------------------------------------------------------------------------------------


def test_www_authenticate_bearer_challenge() -> None:
    header = ('Bearer realm="https://auth.example.com/token",service="registry.example.com",'
              'scope="repository:team/app:pull,push",error="insufficient_scope"')
    assert parse_www_authenticate([header]) == [Challenge("bearer", {
        "realm": "https://auth.example.com/token", "service": "registry.example.com",
        "scope": "repository:team/app:pull,push", "error": "insufficient_scope"})]


def test_www_authenticate_several_challenges_and_escapes() -> None:
    values = ['Basic realm="Registry \\"Realm\\"", charset=UTF-8, Bearer realm="https://a/t"', "Negotiate"]
    assert parse_www_authenticate(values) == [
        Challenge("basic", {"realm": 'Registry "Realm"', "charset": "UTF-8"}),
        Challenge("bearer", {"realm": "https://a/t"}),
        Challenge("negotiate", {}),
    ]


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def test_token_lifetime_defaults_to_sixty_seconds() -> None:
    clock = FakeClock()
    cache = TokenCache(clock)
    cache.put(("h", "s"), "tok")
    clock.now += 50
    assert cache.get(("h", "s")) == "tok"
    clock.now += 6  # within the safety margin of expiry
    assert cache.get(("h", "s")) is None


def test_token_lifetime_counts_from_issued_at_but_never_beyond_now() -> None:
    clock = FakeClock()
    cache = TokenCache(clock)
    cache.put(("h", "old"), "a", expires_in=300, issued_at=clock.now - 296)
    cache.put(("h", "future"), "b", expires_in=300, issued_at=clock.now + 1000)  # server clock ahead
    cache.put(("h", "fresh"), "c", expires_in=300)
    assert cache.get(("h", "old")) is None
    clock.now += 290
    assert (cache.get(("h", "future")), cache.get(("h", "fresh"))) == ("b", "c")
    clock.now += 6
    assert (cache.get(("h", "future")), cache.get(("h", "fresh"))) == (None, None)


def test_token_invalidation_only_drops_that_token() -> None:
    cache = TokenCache(FakeClock())
    cache.put(("h", "s"), "new")
    cache.invalidate(("h", "s"), "old")
    assert cache.get(("h", "s")) == "new"
    cache.invalidate(("h", "s"), "new")
    assert cache.get(("h", "s")) is None


def test_retry_after_seconds_dates_and_cap() -> None:
    now = 1_700_000_000.0
    assert retry_after_seconds("2") == 2.0
    assert retry_after_seconds("86400") == MAX_RETRY_AFTER
    assert retry_after_seconds(email.utils.formatdate(now + 5, usegmt=True), now=now) == pytest.approx(5, abs=1)
    assert retry_after_seconds(email.utils.formatdate(now - 5, usegmt=True), now=now) == 0.0
    assert retry_after_seconds("soon") is None
    assert retry_after_seconds(None) is None
