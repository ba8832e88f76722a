"""Exceptions that reach users.

Every error a user can cause or fix (a bad reference, a wrong password, a missing kernel feature, a
full disk) is an `AfsdError` whose message is one self-contained line: what went wrong, with the thing
that went wrong named, and where possible what to do about it. The CLI prints that line and exits
non-zero instead of showing a traceback.
"""

from __future__ import annotations


class AfsdError(Exception):
    """Base class for errors whose message is meant for the user."""

    exit_code: int = 1


class InvalidReferenceError(AfsdError, ValueError):
    """An image reference that cannot be parsed."""

    exit_code = 2


class RegistryError(AfsdError):
    """A registry answered with an error, or could not be reached."""


class RegistryUnreachableError(RegistryError):
    """No connection could be made to a registry (or any of its mirrors)."""


class RegistryAuthError(RegistryError):
    """The registry refused our credentials (or we had none)."""


class NotFoundError(RegistryError):
    """The registry does not know the repository, tag or blob."""


class ManifestFormatError(RegistryError):
    """A manifest, index or image config that is not valid JSON of the expected shape."""


class PlatformNotFoundError(AfsdError):
    """An image index has no manifest for the requested platform."""


class DigestMismatchError(AfsdError):
    """Content did not hash to the digest it was requested by."""


class UnsupportedMediaTypeError(AfsdError):
    """A manifest or layer uses a media type we do not handle."""


class LayerFormatError(AfsdError):
    """A layer archive is corrupt, truncated or not a tar."""


class ConversionError(AfsdError):
    """Turning a layer into an erofs blob failed (mkfs.erofs, disk space, ...)."""


class MissingToolError(AfsdError):
    """An external program afsd needs is not installed."""


class CacheFullError(AfsdError):
    """The layer cache cannot make room for what was asked."""


class MountError(AfsdError):
    """A mount or unmount failed."""


class UsageError(AfsdError):
    """A command-line option or combination of options that cannot work."""

    exit_code = 2


class FetchError(AfsdError):
    """No layerstore could serve verified bytes of a layer's blob (every provider failed, or none holds it)."""
