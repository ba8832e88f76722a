"""Who is on the other end of a mutual-TLS call: the name, role and hosts of its certificate.

gRPC has already checked that the certificate chains to the cluster CA (the server requires client
certificates); this module reads what the certificate says. Role and name follow Kubernetes'
convention: organization `afsd:nodes` or `afsd:users`, common name = node id or user name. A node
certificate's subjectAltNames (DNS names, IPs) are the hosts it may serve and advertise.
"""

from __future__ import annotations

import functools
import ipaddress
from dataclasses import dataclass
from typing import TYPE_CHECKING

import grpc

if TYPE_CHECKING:  # cryptography is imported when a certificate is read: dev mode never loads it
    from cryptography import x509

NODE_ROLE = "afsd:nodes"
USER_ROLE = "afsd:users"
ROLES = (NODE_ROLE, USER_ROLE)


@dataclass(frozen=True)
class PeerIdentity:
    name: str
    roles: frozenset[str]
    hosts: frozenset[str]      # DNS names (lowercase) and IP addresses (normalised text)

    @property
    def is_node(self) -> bool:
        return NODE_ROLE in self.roles

    def covers_host(self, host: str) -> bool:
        """Whether `host` (a name or an IP, [v6] allowed) is one of this certificate's hosts."""
        return _normal_host(host) in self.hosts

    def __str__(self) -> str:
        return f"{self.name} ({', '.join(sorted(self.roles)) or 'no role'})"


def identity_of_certificate(certificate: x509.Certificate) -> PeerIdentity:
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    subject = certificate.subject
    names = [a.value for a in subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    roles = frozenset(str(a.value) for a in subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)) & set(ROLES)
    try:
        alt = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        hosts = {name.lower() for name in alt.get_values_for_type(x509.DNSName)}
        hosts |= {str(address) for address in alt.get_values_for_type(x509.IPAddress)}
    except x509.ExtensionNotFound:
        hosts = set()
    return PeerIdentity(str(names[0]) if names else "", roles, frozenset(hosts))


@functools.lru_cache(maxsize=256)
def _identity_of_pem(pem: bytes) -> PeerIdentity:
    from cryptography import x509

    return identity_of_certificate(x509.load_pem_x509_certificate(pem))


def identity_of(context: grpc.aio.ServicerContext) -> PeerIdentity | None:
    """The client certificate's identity, or None on a connection without one (no TLS)."""
    certificates = context.auth_context().get("x509_pem_cert")
    return _identity_of_pem(certificates[0]) if certificates else None


def _normal_host(host: str) -> str:
    host = host.strip("[]")
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        return host.lower().rstrip(".")
