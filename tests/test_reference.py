"""Image references: every spelling of one image gets one key; malformed ones get a one-line error."""

from __future__ import annotations

import pytest

from afsd.errors import InvalidReferenceError
from afsd.oci.reference import ImageReference, parse_reference

DIGEST = "sha256:" + "ab" * 32


@pytest.mark.parametrize("text", [
    "alpine", "alpine:latest", "library/alpine", "library/alpine:latest", "docker.io/alpine",
    "docker.io/library/alpine:latest", "index.docker.io/library/alpine", "registry-1.docker.io/alpine",
    "Docker.IO/library/alpine", "  alpine  ",
])
def test_docker_hub_spellings_are_one_image(text: str) -> None:
    ref = parse_reference(text)
    assert ref == ImageReference("docker.io", "library/alpine", "latest", None)
    assert str(ref) == "docker.io/library/alpine:latest"
    assert ref.key == "docker.io/library/alpine:latest"
    assert ref.api_host == "registry-1.docker.io"
    assert ref.manifest_reference == "latest"


def test_docker_hub_user_repository_has_no_library_prefix() -> None:
    ref = parse_reference("someuser/tool:1.2")
    assert (ref.registry, ref.repository, ref.tag) == ("docker.io", "someuser/tool", "1.2")


@pytest.mark.parametrize("text, registry, repository, tag", [
    ("localhost/app", "localhost", "app", "latest"),
    ("localhost:5000/app:v1", "localhost:5000", "app", "v1"),
    ("127.0.0.1:5000/team/app:v1", "127.0.0.1:5000", "team/app", "v1"),
    ("Registry.Example.COM/a/b/c", "registry.example.com", "a/b/c", "latest"),
    ("[::1]:5000/app", "[::1]:5000", "app", "latest"),
    ("ghcr.io/owner/repo-name_x.y:1.0-rc.1", "ghcr.io", "owner/repo-name_x.y", "1.0-rc.1"),
])
def test_hosts_with_ports_and_localhost(text: str, registry: str, repository: str, tag: str) -> None:
    ref = parse_reference(text)
    assert (ref.registry, ref.repository, ref.tag, ref.digest) == (registry, repository, tag, None)
    assert ref.api_host == registry
    assert ref.name == f"{registry}/{repository}"


def test_first_component_without_dot_or_port_is_a_docker_hub_user() -> None:
    ref = parse_reference("myhost/app")
    assert (ref.registry, ref.repository) == ("docker.io", "myhost/app")


def test_digest_reference_pins_content() -> None:
    ref = parse_reference(f"127.0.0.1:5000/app@{DIGEST}")
    assert ref.digest == DIGEST
    assert ref.tag == "latest"
    assert ref.manifest_reference == DIGEST
    assert ref.key == f"127.0.0.1:5000/app@{DIGEST}"


def test_uppercase_digest_hex_is_normalised() -> None:
    ref = parse_reference("app@sha256:" + "AB" * 32)
    assert ref.digest == DIGEST


def test_tag_and_digest_keep_both_and_key_on_digest() -> None:
    ref = parse_reference(f"localhost:5000/app:v1@{DIGEST}")
    assert (ref.tag, ref.digest) == ("v1", DIGEST)
    assert str(ref) == f"localhost:5000/app:v1@{DIGEST}"
    assert ref.manifest_reference == DIGEST
    # Same content, other tag: same key.
    assert ref.key == parse_reference(f"localhost:5000/app:v2@{DIGEST}").key


def test_tag_field_fills_in_missing_tag() -> None:
    assert parse_reference("alpine", tag="3.20").tag == "3.20"
    assert parse_reference("alpine:3.20", tag="3.20").tag == "3.20"
    assert parse_reference(f"alpine@{DIGEST}", tag="3.20").tag == "3.20"
    assert parse_reference("alpine", tag="  ").tag == "latest"


def test_tag_field_contradicting_reference_is_rejected() -> None:
    with pytest.raises(InvalidReferenceError, match="tag mismatch.*'3.19'.*'3.20'"):
        parse_reference("alpine:3.19", tag="3.20")


def test_with_digest_validates_and_keeps_tag() -> None:
    ref = parse_reference("alpine:3.20").with_digest(DIGEST)
    assert (ref.tag, ref.digest) == ("3.20", DIGEST)
    with pytest.raises(InvalidReferenceError):
        parse_reference("alpine").with_digest("sha256:1234")


@pytest.mark.parametrize("text, complaint", [
    ("", "empty image reference"),
    ("   ", "empty image reference"),
    ("Alpine", "repository component 'Alpine'"),
    ("library/Alpine:latest", "repository component 'Alpine'"),
    ("alpine:", "bad tag ''"),
    ("alpine:bad/tag", "bad registry host 'alpine:bad'"),
    ("alpine:-tag", "bad tag '-tag'"),
    ("alpine:t\u00e4g", "bad tag"),
    ("alpine:" + "t" * 129, "bad tag"),
    ("alpine@sha256:1234", "sha256 needs 64 hex digits"),
    ("alpine@md5:" + "a" * 32, "invalid digest"),
    ("alpine@sha256:" + "g" * 64, "invalid digest"),
    ("alpine@", "invalid digest"),
    ("my image", "contains whitespace"),
    ("localhost:5000/", "no repository name"),
    ("host:99999/app", "bad registry host"),
    ("-bad.example.com/app", "bad registry host"),
    ("https://registry.example.com/app", "bad registry host"),
    ("registry.example.com/a//b", "repository component ''"),
    ("app__", "repository component 'app__'"),
    ("example.com/" + "a" * 250, "longer than 255"),
])
def test_malformed_references_give_one_line_errors(text: str, complaint: str) -> None:
    with pytest.raises(InvalidReferenceError) as caught:
        parse_reference(text)
    message = str(caught.value)
    assert complaint in message
    assert "\n" not in message


@pytest.mark.parametrize("tag", ["bad tag", "-x", "a/b", "t\u00e4g"])
def test_malformed_tag_field_is_rejected(tag: str) -> None:
    with pytest.raises(InvalidReferenceError, match="tag"):
        parse_reference("alpine", tag=tag)
