"""This process's TLS material: the cluster CA, its own certificate and key, and gRPC credentials
made from them (servers that require a client certificate from the CA; channels that present ours
and check the server's against the CA and the address dialled).

`--tls-dir DIR` reads cert-manager's secret layout (`ca.crt`, `tls.crt`, `tls.key`), which is also what
`afsd certs issue` writes; `--tls-ca/--tls-cert/--tls-key` name the three files one by one. Without
either a daemon runs in dev mode: plaintext, no authentication, peer answers unverified.
"""

from __future__ import annotations

import functools
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc

from afsd.errors import UsageError
from afsd.trust.identity import PeerIdentity, identity_of_certificate

if TYPE_CHECKING:
    from cryptography import x509

DEV_MODE_WARNING = ("runs WITHOUT TLS: no caller is authenticated and peers' blob descriptions are not "
                    "verified (dev mode); give --tls-dir for mutual TLS")


@dataclass(frozen=True)
class TlsConfig:
    ca_path: Path
    cert_path: Path | None = None   # None: a client that only checks servers (and shows a bearer token)
    key_path: Path | None = None

    @classmethod
    def from_dir(cls, directory: Path) -> "TlsConfig":
        return cls(directory / "ca.crt", directory / "tls.crt", directory / "tls.key")

    @classmethod
    def from_json(cls, data: dict[str, str] | None) -> "TlsConfig | None":
        """The inverse of `to_json` (None for dev mode): how a fetch worker gets its parent's TLS files."""
        return cls(Path(data["ca"]), Path(data["cert"]), Path(data["key"])) if data else None

    def to_json(self) -> dict[str, str]:
        return {"ca": str(self.ca_path), "cert": str(self.cert_path), "key": str(self.key_path)}

    @property
    def has_certificate(self) -> bool:
        return self.cert_path is not None

    def check(self) -> "TlsConfig":
        """Load everything once, so a bad file is one clear line at startup; returns self."""
        _ = self.ca_pem, self.ca_certificates
        if self.has_certificate:
            _ = self.cert_pem, self.key_pem, self.identity, self.private_key
        return self

    @functools.cached_property
    def ca_pem(self) -> bytes:
        return _read(self.ca_path, "CA certificate")

    @functools.cached_property
    def cert_pem(self) -> bytes:
        return _read(self._own(self.cert_path), "certificate")

    @functools.cached_property
    def key_pem(self) -> bytes:
        return _read(self._own(self.key_path), "key")

    def _own(self, path: Path | None) -> Path:
        if path is None:
            raise UsageError("this needs a certificate of its own: give --tls-dir or --tls-cert and --tls-key")
        return path

    @functools.cached_property
    def ca_certificates(self) -> list[x509.Certificate]:
        from cryptography import x509

        try:
            return x509.load_pem_x509_certificates(self.ca_pem)
        except ValueError as error:
            raise UsageError(f"{self.ca_path} is not a PEM certificate: {error}") from None

    @functools.cached_property
    def chain(self) -> list[x509.Certificate]:
        """Our certificate, then any intermediates that came with it."""
        from cryptography import x509

        try:
            return x509.load_pem_x509_certificates(self.cert_pem)
        except ValueError as error:
            raise UsageError(f"{self.cert_path} is not a PEM certificate: {error}") from None

    @functools.cached_property
    def identity(self) -> PeerIdentity:
        return identity_of_certificate(self.chain[0])

    @functools.cached_property
    def private_key(self) -> Any:
        from cryptography.hazmat.primitives import serialization

        try:
            return serialization.load_pem_private_key(self.key_pem, password=None)
        except (ValueError, TypeError) as error:
            raise UsageError(f"{self.key_path} is not an unencrypted PEM private key: {error}") from None

    def server_credentials(self, *, require_client_certificate: bool = True) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials([(self.key_pem, self.cert_pem)], root_certificates=self.ca_pem,
                                           require_client_auth=require_client_certificate)

    def channel_credentials(self) -> grpc.ChannelCredentials:
        if not self.has_certificate:
            return grpc.ssl_channel_credentials(root_certificates=self.ca_pem)
        return grpc.ssl_channel_credentials(root_certificates=self.ca_pem, private_key=self.key_pem,
                                            certificate_chain=self.cert_pem)

    def ssl_server_context(self) -> ssl.SSLContext:
        """For listeners outside gRPC (the byte-stream data listener): our certificate, client
        certificates from the cluster CA required."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(self._own(self.cert_path), self._own(self.key_path))
        context.load_verify_locations(cafile=str(self.ca_path))
        context.verify_mode = ssl.CERT_REQUIRED
        return context

    def ssl_client_context(self) -> ssl.SSLContext:
        """For connections outside gRPC: the server's certificate checked against the CA and the host
        dialled; ours presented if we have one."""
        context = ssl.create_default_context(cafile=str(self.ca_path))
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        if self.has_certificate:
            context.load_cert_chain(self._own(self.cert_path), self._own(self.key_path))
        return context

    def describe(self) -> str:
        return f"mutual TLS as {self.identity} (CA {self.ca_path})"


def security_line(daemon: str, tls: TlsConfig | None, listen: str = "") -> str:
    """What a daemon says at start about how it authenticates: loud in dev mode, and louder when it also
    listens beyond this machine."""
    if tls is not None:
        return f"{daemon}: {tls.describe()}"
    host = listen.rpartition(":")[0].strip("[]")
    exposed = f"; it listens on {listen}, beyond this machine" if listen and host not in (
        "127.0.0.1", "::1", "localhost") and not listen.startswith("unix:") else ""
    return f"{daemon} {DEV_MODE_WARNING}{exposed}"


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as error:
        raise UsageError(f"cannot read the TLS {what} {path}: {error.strerror}") from None
