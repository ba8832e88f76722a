"""Image references: parsing and normalisation.

The same image must always get the same key, whatever spelling a user chose: `alpine`,
`library/alpine:latest` and `docker.io/library/alpine:latest` are one image. The grammar follows the
distribution project's reference package (the one `docker pull` uses):

    [host[:port]/]path[:tag][@algorithm:hex]

The first path component is a registry host only if it contains a `.` or a `:`, or is `localhost`;
otherwise the image lives on Docker Hub, where one-component names get the `library/` prefix.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from afsd.errors import InvalidReferenceError
from afsd.oci.digest import parse_digest

DOCKER_HUB = "docker.io"
DOCKER_HUB_API_HOST = "registry-1.docker.io"
DEFAULT_TAG = "latest"

_HUB_ALIASES = {"docker.io", "index.docker.io", "registry-1.docker.io", "registry.hub.docker.com"}
_PATH_COMPONENT = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*")
_HOST = re.compile(
    r"(?:localhost|\[[0-9a-fA-F:.]+\]|[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?"
    r"(?:\.[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?)*)(?::(?P<port>[0-9]{1,5}))?"
)
# ASCII only: `\w` alone would also accept non-ASCII letters, which registries reject.
_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
_MAX_NAME_LENGTH = 255


@dataclass(frozen=True, order=True)
class ImageReference:
    """A parsed, normalised image reference.

    `registry` is the canonical host (`docker.io` for Docker Hub), `repository` the full path
    (`library/alpine`), `tag` always set (default `latest`), `digest` set when the user pinned one.
    """

    registry: str
    repository: str
    tag: str = DEFAULT_TAG
    digest: str | None = None

    @property
    def api_host(self) -> str:
        """The host that serves the registry API (Docker Hub's API is not on docker.io itself)."""
        return DOCKER_HUB_API_HOST if self.registry == DOCKER_HUB else self.registry

    @property
    def name(self) -> str:
        """`registry/repository`, without tag or digest."""
        return f"{self.registry}/{self.repository}"

    @property
    def manifest_reference(self) -> str:
        """What goes after `/manifests/` in the API: the digest if pinned, else the tag."""
        return self.digest or self.tag

    @property
    def key(self) -> str:
        """The identity of the image content this reference names.

        A digest fixes the content, so a pinned reference's key ignores the tag.
        """
        if self.digest:
            return f"{self.name}@{self.digest}"
        return f"{self.name}:{self.tag}"

    def with_digest(self, digest: str) -> "ImageReference":
        return ImageReference(self.registry, self.repository, self.tag, parse_digest(digest))

    def __str__(self) -> str:
        text = f"{self.name}:{self.tag}"
        return f"{text}@{self.digest}" if self.digest else text


def canonical_registry(host: str) -> str:
    """Lower-case `host[:port]` (host names are case-insensitive; one spelling keeps keys stable),
    with every Docker Hub spelling turned into `docker.io`."""
    host = host.strip().lower()
    return DOCKER_HUB if host in _HUB_ALIASES else host


def is_valid_host(text: str) -> bool:
    """Whether `text` is a registry `host[:port]` (DNS name, IPv4, `[IPv6]` or localhost)."""
    match = _HOST.fullmatch(text)
    return match is not None and int(match["port"] or 0) <= 65535


def _split_host(text: str) -> tuple[str | None, str]:
    first, slash, rest = text.partition("/")
    if slash and (("." in first) or (":" in first) or first == "localhost" or first.startswith("[")):
        return first, rest
    return None, text


def parse_reference(text: str, tag: str | None = None) -> ImageReference:
    """Parse and normalise an image reference.

    `tag` is the separate tag field of the wire protocols (`image` + `tag`): it is used when the
    reference has no tag, and must agree with it when it has one.
    """
    original = text
    text = text.strip()
    if not text:
        raise InvalidReferenceError("empty image reference")
    if any(ch.isspace() for ch in text):
        raise InvalidReferenceError(f"invalid image reference {original!r}: contains whitespace")

    digest: str | None = None
    if "@" in text:
        text, _, digest_text = text.partition("@")
        digest = parse_digest(digest_text)

    host, path = _split_host(text)
    ref_tag: str | None = None
    last_slash = path.rfind("/")
    colon = path.rfind(":")
    if colon > last_slash:
        path, ref_tag = path[:colon], path[colon + 1 :]
        if not _TAG.fullmatch(ref_tag):
            raise InvalidReferenceError(f"invalid image reference {original!r}: bad tag {ref_tag!r}")

    explicit_tag = (tag or "").strip() or None
    if explicit_tag is not None:
        if not _TAG.fullmatch(explicit_tag):
            raise InvalidReferenceError(f"invalid tag {explicit_tag!r} for image {original!r}")
        if ref_tag is not None and ref_tag != explicit_tag:
            raise InvalidReferenceError(
                f"image tag mismatch: {original!r} says {ref_tag!r} but the tag field says {explicit_tag!r}"
            )
        ref_tag = explicit_tag

    if host is not None:
        if not is_valid_host(host):
            raise InvalidReferenceError(f"invalid image reference {original!r}: bad registry host {host!r}")
        registry = canonical_registry(host)
    else:
        registry = DOCKER_HUB

    if not path:
        raise InvalidReferenceError(f"invalid image reference {original!r}: no repository name")
    components = path.split("/")
    for component in components:
        if not _PATH_COMPONENT.fullmatch(component):
            raise InvalidReferenceError(
                f"invalid image reference {original!r}: repository component {component!r} must be "
                "lower-case letters, digits and separators (. _ __ -)"
            )
    if registry == DOCKER_HUB and len(components) == 1:
        path = f"library/{path}"
    if len(registry) + 1 + len(path) > _MAX_NAME_LENGTH:
        raise InvalidReferenceError(f"invalid image reference {original!r}: name longer than 255 characters")

    return ImageReference(registry=registry, repository=path, tag=ref_tag or DEFAULT_TAG, digest=digest)
