"""Content digests (`sha256:<hex>`): their grammar, and hashing content as it streams past.

Every byte afsd takes from a registry is addressed by a digest and checked against it before use:
manifests and config blobs in memory (`verify_bytes`), layer blobs while they stream to disk
(`Digester`). The grammar check also keeps hostile input out of URL paths and file names, since a
digest ends up in both.
"""

from __future__ import annotations

import hashlib
import re

from afsd.errors import DigestMismatchError, InvalidReferenceError

_HEX_LENGTH = {"sha256": 64, "sha512": 128}
_HEX = re.compile(r"[0-9a-fA-F]+")


def parse_digest(text: str) -> str:
    """Validate `algorithm:hex` and return it lower-cased; raise InvalidReferenceError otherwise."""
    algorithm, sep, hexpart = text.partition(":")
    expected = _HEX_LENGTH.get(algorithm.lower())
    if not sep or expected is None:
        raise InvalidReferenceError(f"invalid digest {text!r}: expected sha256:<64 hex digits>")
    if len(hexpart) != expected or not _HEX.fullmatch(hexpart):
        raise InvalidReferenceError(f"invalid digest {text!r}: {algorithm} needs {expected} hex digits")
    return f"{algorithm.lower()}:{hexpart.lower()}"


def digest_algorithm(digest: str) -> str:
    """`sha256` for `sha256:...` (the digest must already be valid)."""
    return digest.partition(":")[0]


class Digester:
    """Hashes content incrementally with the algorithm of an expected digest."""

    def __init__(self, algorithm: str = "sha256") -> None:
        self.algorithm = algorithm
        self._hash = hashlib.new(algorithm)
        self.size = 0

    def update(self, chunk: bytes) -> None:
        self._hash.update(chunk)
        self.size += len(chunk)

    @property
    def digest(self) -> str:
        return f"{self.algorithm}:{self._hash.hexdigest()}"


def digest_bytes(data: bytes, algorithm: str = "sha256") -> str:
    digester = Digester(algorithm)
    digester.update(data)
    return digester.digest


def verify_bytes(data: bytes, expected: str, *, what: str) -> None:
    """Raise DigestMismatchError (naming `what`) unless `data` hashes to `expected`."""
    actual = digest_bytes(data, digest_algorithm(expected))
    if actual != expected:
        raise DigestMismatchError(f"{what} does not match its digest {expected}: the content hashes to {actual}")


def is_blob(data: bytes, digest: str, size: int) -> bool:
    """Whether `data` is exactly the blob a descriptor (`digest`, `size`) names: for bytes from a peer."""
    return len(data) == size and digest_bytes(data, digest_algorithm(digest)) == digest
