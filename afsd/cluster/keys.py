"""Image keys: the one spelling of "this image on this platform" that the whole cluster agrees on.

A key is the normalised reference's key plus the platform, e.g.
`docker.io/library/alpine:latest|linux/amd64`. The reference AFS built keys from the raw request strings
(`alpine|latest|linux|amd64||v2`), so `alpine` and `docker.io/library/alpine` were different images;
afsd normalises, and also accepts keys in the reference's six-field form from older clients.
"""

from __future__ import annotations

from afsd.oci.platform import Platform, parse_platform
from afsd.oci.reference import ImageReference, parse_reference

_REFERENCE_KEY_FIELDS = 6  # image|tag|os|arch|variant|v2


def image_key(reference: ImageReference, platform: Platform) -> str:
    return f"{reference.key}|{platform}"


def request_image_key(image: str, tag: str = "", platform_os: str = "", platform_arch: str = "",
                      platform_variant: str = "") -> str:
    """The key for the image/tag/platform fields of a wire request (defaults: linux/amd64)."""
    reference = parse_reference(image, tag or None)
    platform = parse_platform(os=platform_os or "linux", architecture=platform_arch or "amd64",
                              variant=platform_variant)
    return image_key(reference, platform)


def normalise_image_key(text: str) -> str:
    """Accept an afsd key, a reference-style six-field key or a bare reference; return an afsd key.

    Raises InvalidReferenceError for what cannot be parsed.
    """
    text = text.strip()
    fields = text.split("|")
    if len(fields) == _REFERENCE_KEY_FIELDS:
        image, tag, platform_os, platform_arch, platform_variant, _version = (f.strip() for f in fields)
        return request_image_key(image, tag, platform_os, platform_arch, platform_variant)
    if len(fields) == 2:
        return image_key(parse_reference(fields[0]), parse_platform(fields[1]))
    return request_image_key(text)
