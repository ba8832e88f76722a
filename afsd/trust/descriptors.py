"""Blob descriptors: what ties an erofs blob and its chunk table to the registry layer it was made from.

A reader fetches a layer's blob from whatever peer holds it, and checks every chunk against the blob's
chunk digest table. That table must not come from the word of the peer serving the bytes: it is
rooted in a *descriptor* the converting layerstore signed with its node key (issued by the cluster
CA) when it made the blob from the registry layer:

    {"v": 2, "layer_digest", "diff_id", "converter", "blob_digest", "size", "chunk_size",
     "chunk_table_digest", "data_map_digest", "implicit_dirs_digest", "metadata_digest", "signer", "signed_unix"}

(Version 1, from converters before afsd-erofs/3, has no "metadata_digest": such descriptors still verify,
and then the answer must carry none either.)

Copies keep the converter's signed descriptor and serve it with the blob (`StatLayerResponse.descriptor`).
`BlobTrust.verified_descriptor` is the one check every reader makes before using a StatLayer answer:
the signer's certificate leads to the cluster CA and has the node role, the signature holds, the
descriptor names the layer digest asked for (and the image config's diff_id), and every field of the
answer — blob digest, size, chunk size, chunk table, data map, implicit dirs, metadata digest — is what it
attests.
Without TLS material (dev mode) nothing is signed and nothing can be verified; daemons say so on start.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from afsd.api import layerstore_pb2 as lpb
from afsd.cluster.peer_answers import PeerAnswerError
from afsd.erofs.convert import BlobInfo
from afsd.trust.identity import identity_of_certificate

if TYPE_CHECKING:  # cryptography is imported when something is signed or verified: dev mode never loads it
    from cryptography import x509

    from afsd.trust.tls import TlsConfig

DESCRIPTOR_VERSION = 2
# The version of a descriptor without a metadata digest (converters before afsd-erofs/3), still verified.
UNDIGESTED_VERSION = 1
MAX_CHAIN_BYTES = 64 << 10
MAX_PAYLOAD_BYTES = 4 << 10


def chunk_table_digest(digests: Iterable[bytes]) -> str:
    return "sha256:" + hashlib.sha256(b"".join(digests)).hexdigest()


def data_map_digest(ranges: Iterable[tuple[int, int]]) -> str:
    return "sha256:" + hashlib.sha256("".join(f"{o}+{n}\n" for o, n in ranges).encode()).hexdigest()


def implicit_dirs_digest(paths: Iterable[str]) -> str:
    return "sha256:" + hashlib.sha256("".join(f"{p}\n" for p in paths).encode()).hexdigest()


@dataclass(frozen=True)
class BlobDescriptor:
    layer_digest: str
    diff_id: str
    converter: str
    blob_digest: str
    size: int
    chunk_size: int
    chunk_table_digest: str
    data_map_digest: str
    implicit_dirs_digest: str
    signer: str
    signed_unix: int
    metadata_digest: str = ""      # "" only in version-1 descriptors

    @classmethod
    def of_blob(cls, blob: BlobInfo, signer: str) -> "BlobDescriptor":
        return cls(layer_digest=blob.layer_digest, diff_id=blob.diff_id, converter=blob.converter,
                   blob_digest=blob.digest, size=blob.size, chunk_size=blob.chunk_size,
                   chunk_table_digest=chunk_table_digest(blob.chunk_digests),
                   data_map_digest=data_map_digest(blob.data_map),
                   implicit_dirs_digest=implicit_dirs_digest(blob.implicit_dirs), signer=signer,
                   signed_unix=int(time.time()), metadata_digest=blob.metadata_digest)

    def payload(self) -> bytes:
        """The canonical bytes that are signed (version 1, without the field, for a blob without a metadata digest)."""
        document = asdict(self)
        if not self.metadata_digest:
            del document["metadata_digest"]
        version = DESCRIPTOR_VERSION if self.metadata_digest else UNDIGESTED_VERSION
        return json.dumps({"v": version, **document}, sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def parse(cls, payload: bytes) -> "BlobDescriptor":
        """ValueError unless `payload` is exactly a canonical descriptor of version 2 (or 1: without the
        metadata digest)."""
        if len(payload) > MAX_PAYLOAD_BYTES:
            raise ValueError(f"descriptor of {len(payload)} bytes")
        document = json.loads(payload)
        version = document.pop("v", None) if isinstance(document, dict) else None
        if version not in (DESCRIPTOR_VERSION, UNDIGESTED_VERSION):
            raise ValueError(f"not a version-{UNDIGESTED_VERSION} or -{DESCRIPTOR_VERSION} blob descriptor")
        types = {name: field.type for name, field in cls.__dataclass_fields__.items()}
        if version == UNDIGESTED_VERSION:
            del types["metadata_digest"]
        if set(document) != set(types) or any(
                not isinstance(document[k], int if types[k] in ("int", int) else str) or isinstance(document[k], bool)
                for k in document):
            raise ValueError("blob descriptor fields are missing, extra or of the wrong type")
        descriptor = cls(**document)
        if descriptor.payload() != payload:
            raise ValueError("blob descriptor is not in canonical form")
        return descriptor

    def mismatch(self, stat: lpb.StatLayerResponse) -> str | None:
        """The first field of `stat` that differs from what this descriptor attests, or None."""
        checks: Sequence[tuple[str, Any, Any]] = (
            ("blob digest", stat.blob_digest, self.blob_digest), ("size", stat.afs_size, self.size),
            ("chunk size", stat.chunk_size, self.chunk_size), ("diff_id", stat.diff_id, self.diff_id),
            ("converter", stat.converter, self.converter),
            ("chunk table", chunk_table_digest(stat.chunk_digests), self.chunk_table_digest),
            ("data map", data_map_digest((r.offset, r.length) for r in stat.data_map), self.data_map_digest),
            ("implicit dir list", implicit_dirs_digest(stat.implicit_dirs), self.implicit_dirs_digest),
            ("metadata digest", stat.metadata_digest, self.metadata_digest))
        for what, answered, attested in checks:
            if answered != attested:
                return f"its {what} differs from the signed one ({attested})"
        return None


class BlobTrust:
    """Signs (on converting layerstores) and verifies (on every reader) blob descriptors with the
    cluster CA of `tls`; with `tls` None (dev mode) signs nothing and verifies nothing."""

    def __init__(self, tls: TlsConfig | None) -> None:
        self.tls = tls
        self._verified: dict[tuple[bytes, bytes, bytes], BlobDescriptor] = {}

    @property
    def verifying(self) -> bool:
        return self.tls is not None

    def sign(self, blob: BlobInfo) -> lpb.SignedBlobDescriptor:
        """The signed descriptor of a blob this node just converted (an empty one in dev mode)."""
        if self.tls is None:
            return lpb.SignedBlobDescriptor()
        payload = BlobDescriptor.of_blob(blob, self.tls.identity.name).payload()
        return lpb.SignedBlobDescriptor(payload=payload, signature=_sign(self.tls.private_key, payload),
                                        certificate_chain=self.tls.cert_pem)

    def verified_descriptor(self, stat: lpb.StatLayerResponse, layer_digest: str, *, peer: str,
                            diff_id: str | None = None) -> BlobDescriptor | None:
        """The descriptor that makes `stat` (a StatLayer answer for `layer_digest`, from `peer`)
        trustworthy: signed by a node of the cluster CA, about this layer (and `diff_id`), attesting
        every field of `stat`. Raises PeerAnswerError naming `peer` otherwise. None in dev mode."""
        if self.tls is None:
            return None
        signed = stat.descriptor
        if not signed.payload:
            raise PeerAnswerError(peer, f"sent no signed blob descriptor for layer {layer_digest}")
        key = (signed.payload, signed.signature, signed.certificate_chain)
        descriptor = self._verified.get(key)
        if descriptor is None:
            descriptor = self._verify_signature(signed, peer)
            if len(self._verified) > 4096:
                self._verified.clear()
            self._verified[key] = descriptor
        if descriptor.layer_digest != layer_digest:
            raise PeerAnswerError(peer, f"its signed descriptor is for layer {descriptor.layer_digest}, "
                                        f"not {layer_digest}")
        if diff_id is not None and descriptor.diff_id != diff_id:
            raise PeerAnswerError(peer, f"its signed descriptor of layer {layer_digest} has diff_id "
                                        f"{descriptor.diff_id}, the image config {diff_id}")
        problem = descriptor.mismatch(stat)
        if problem:
            raise PeerAnswerError(peer, f"its answer for layer {layer_digest} is not what {descriptor.signer} "
                                        f"signed: {problem}")
        return descriptor

    def _verify_signature(self, signed: lpb.SignedBlobDescriptor, peer: str) -> BlobDescriptor:
        from cryptography import x509
        from cryptography.exceptions import InvalidSignature

        assert self.tls is not None
        try:
            if len(signed.certificate_chain) > MAX_CHAIN_BYTES:
                raise ValueError("its certificate chain is too long")
            chain = x509.load_pem_x509_certificates(signed.certificate_chain)
            descriptor = BlobDescriptor.parse(signed.payload)
            signed_at = datetime.datetime.fromtimestamp(descriptor.signed_unix, datetime.timezone.utc)
            _check_chain(chain, self.tls.ca_certificates, signed_at)
            signer = identity_of_certificate(chain[0])
            if not signer.is_node:
                raise ValueError(f"its signer {signer} is not a node")
            if signer.name != descriptor.signer:
                raise ValueError(f"it names signer {descriptor.signer!r} but was signed by {signer.name!r}")
            _verify(chain[0].public_key(), signed.signature, signed.payload)
        except (ValueError, TypeError, InvalidSignature) as error:
            raise PeerAnswerError(peer, f"its blob descriptor does not verify: {str(error) or 'bad signature'}") from None
        return descriptor


def _check_chain(chain: list[x509.Certificate], roots: list[x509.Certificate], signed_at: datetime.datetime) -> None:
    """ValueError unless chain[0] leads, through the intermediates after it, to one of `roots`; the
    leaf was valid when it signed, every certificate above it is valid now."""
    if not chain:
        raise ValueError("no certificate")
    now = datetime.datetime.now(datetime.timezone.utc)
    leaf = chain[0]
    if not leaf.not_valid_before_utc <= signed_at <= leaf.not_valid_after_utc or signed_at > now:
        raise ValueError(f"its signer's certificate was not valid at {signed_at:%Y-%m-%d %H:%M:%S}Z")
    current = leaf
    for _ in range(len(chain) + 1):
        root = next((r for r in roots if r.subject == current.issuer and _issued(current, r)), None)
        if root is not None:
            if not root.not_valid_before_utc <= now <= root.not_valid_after_utc:
                raise ValueError("the cluster CA certificate is not valid now")
            return
        parent = next((c for c in chain[1:] if c.subject == current.issuer and _is_ca(c) and _issued(current, c)),
                      None)
        if parent is None:
            raise ValueError(f"its signer's certificate ({current.subject.rfc4514_string()}) does not lead to "
                             "the cluster CA")
        if not parent.not_valid_before_utc <= now <= parent.not_valid_after_utc:
            raise ValueError("an intermediate certificate is not valid now")
        current = parent
    raise ValueError("its certificate chain loops")


def _issued(certificate: x509.Certificate, issuer: x509.Certificate) -> bool:
    from cryptography.exceptions import InvalidSignature

    try:
        certificate.verify_directly_issued_by(issuer)
        return True
    except (ValueError, TypeError, InvalidSignature):
        return False


def _is_ca(certificate: x509.Certificate) -> bool:
    from cryptography import x509

    try:
        return certificate.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        return False


def _sign(key: Any, payload: bytes) -> bytes:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa

    if isinstance(key, ec.EllipticCurvePrivateKey):
        return key.sign(payload, ec.ECDSA(hashes.SHA256()))
    if isinstance(key, rsa.RSAPrivateKey):
        return key.sign(payload, padding.PKCS1v15(), hashes.SHA256())
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return key.sign(payload)
    raise TypeError(f"cannot sign with a {type(key).__name__}")


def _verify(key: Any, signature: bytes, payload: bytes) -> None:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa

    if isinstance(key, ec.EllipticCurvePublicKey):
        key.verify(signature, payload, ec.ECDSA(hashes.SHA256()))
    elif isinstance(key, rsa.RSAPublicKey):
        key.verify(signature, payload, padding.PKCS1v15(), hashes.SHA256())
    elif isinstance(key, ed25519.Ed25519PublicKey):
        key.verify(signature, payload)
    else:
        raise TypeError(f"cannot verify a {type(key).__name__} signature")
