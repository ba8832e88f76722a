"""A small cluster CA for people without a PKI: `afsd certs init` and `afsd certs issue`.

Layout (one directory per certificate, cert-manager's secret layout, so `--tls-dir` reads either):

    DIR/ca.crt, DIR/ca.key           the cluster CA (keep ca.key off the nodes)
    DIR/<name>/ca.crt                a copy of the CA certificate
    DIR/<name>/tls.crt, tls.key      the certificate issued to <name> and its key (0600)

A certificate names its holder and role the way Kubernetes does: the subject's common name is the
holder's name (a node id or a user name), its organization the role (`afsd:nodes`, `afsd:users`);
node certificates also list the host names and IPs the node is reached at (subjectAltName), for
server authentication and for discovery to bind heartbeats to them (see afsd/trust/identity.py).
Real deployments can issue the same shape with cert-manager instead (docs/security.md).
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from afsd.errors import UsageError
from afsd.trust.identity import NODE_ROLE, ROLES

CA_DAYS = 3650
LEAF_DAYS = 365


@dataclass(frozen=True)
class IssuedFiles:
    ca: Path
    cert: Path
    key: Path


def init_ca(directory: Path, *, name: str = "afsd cluster CA", days: int = CA_DAYS) -> Path:
    """Make a new CA key and self-signed certificate in `directory`; refuse to overwrite one."""
    if (directory / "ca.key").exists() or (directory / "ca.crt").exists():
        raise UsageError(f"{directory} already holds a CA (ca.crt/ca.key); remove them first to make a new one")
    directory.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = _now()
    certificate = (
        x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256()))
    _write_key(directory / "ca.key", key)
    (directory / "ca.crt").write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    return directory / "ca.crt"


def issue(directory: Path, name: str, *, role: str = NODE_ROLE, hosts: list[str] = (),
          days: int = LEAF_DAYS, out: Path | None = None) -> IssuedFiles:
    """Issue a certificate for `name` with `role`, signed by the CA in `directory`, into `out`
    (default `directory/name`) as ca.crt, tls.crt and tls.key."""
    if role not in ROLES:
        raise UsageError(f"role {role!r}: choose one of {', '.join(ROLES)}")
    if not name or "/" in name or name != name.strip() or not name.isprintable():
        raise UsageError(f"certificate name {name!r}: give a node id or user name (printable, no '/')")
    try:
        ca_cert = x509.load_pem_x509_certificate((directory / "ca.crt").read_bytes())
        ca_key = serialization.load_pem_private_key((directory / "ca.key").read_bytes(), password=None)
    except FileNotFoundError:
        raise UsageError(f"no CA in {directory} (ca.crt and ca.key): run `afsd certs init --dir {directory}`") from None
    out = out or directory / name
    out.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    usages = [ExtendedKeyUsageOID.CLIENT_AUTH] + ([ExtendedKeyUsageOID.SERVER_AUTH] if role == NODE_ROLE else [])
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, role),
                                 x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca_cert.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_encipherment=False, key_cert_sign=False,
                                     content_commitment=False, data_encipherment=False, key_agreement=True,
                                     crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_cert.public_key()), critical=False))
    alt_names = [_alt_name(host) for host in hosts]
    if alt_names:
        builder = builder.add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
    certificate = builder.sign(ca_key, hashes.SHA256())
    files = IssuedFiles(out / "ca.crt", out / "tls.crt", out / "tls.key")
    _write_key(files.key, key)
    files.cert.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    files.ca.write_bytes((directory / "ca.crt").read_bytes())
    return files


def _alt_name(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host.strip("[]")))
    except ValueError:
        pass
    if not host or any(c in host for c in "/: ") or len(host) > 253:
        raise UsageError(f"--host {host!r}: give a DNS name or an IP address")
    return x509.DNSName(host)


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    data = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)
