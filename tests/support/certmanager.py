"""cert-manager's objects for the tests, without cert-manager: a strict schema for the parts of its `Issuer`
and `Certificate` (cert-manager.io/v1) that deploy/kubernetes uses, and the Secret cert-manager would
write for a `Certificate` (kubernetes.io/tls: `tls.crt`, `tls.key`, `ca.crt`), issued here with the
cryptography library from the same spec.

Why a schema of our own: kubernetes-validate knows the Kubernetes API only, not custom resources. This
one follows cert-manager v1's CRDs field for field for what it covers (names, types, enums of `usages`,
`privateKey`), and is stricter than the API server: a field it does not know is an error, so a
misspelled field fails here rather than being dropped. Fields deploy/kubernetes does not use are not
in it: adding one means adding it here, checked against cert-manager's CRD.
"""

from __future__ import annotations

import datetime
import ipaddress
import re
from typing import Any

import jsonschema
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

GROUP_VERSION = "cert-manager.io/v1"
# cert-manager's KeyUsage enum (its CRD lists exactly these).
USAGES = ["signing", "digital signature", "content commitment", "key encipherment", "key agreement",
          "data encipherment", "cert sign", "crl sign", "encipher only", "decipher only", "any", "server auth",
          "client auth", "code signing", "email protection", "s/mime", "ipsec end system", "ipsec tunnel",
          "ipsec user", "timestamping", "ocsp signing", "microsoft sgc", "netscape sgc"]
_STRINGS = {"type": "array", "items": {"type": "string"}}
_DURATION = {"type": "string", "pattern": r"^([0-9]+(\.[0-9]+)?(h|m|s|ms))+$"}
_METADATA = {"type": "object", "required": ["name", "namespace"], "additionalProperties": False,
             "properties": {"name": {"type": "string"}, "namespace": {"type": "string"},
                            "labels": {"type": "object"}, "annotations": {"type": "object"}}}


def _object(kind: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {"type": "object", "required": ["apiVersion", "kind", "metadata", "spec"], "additionalProperties": False,
            "properties": {"apiVersion": {"const": GROUP_VERSION}, "kind": {"const": kind}, "metadata": _METADATA,
                           "spec": spec}}


SCHEMAS: dict[str, dict[str, Any]] = {
    "Issuer": _object("Issuer", {
        "type": "object", "additionalProperties": False, "minProperties": 1, "maxProperties": 1,
        "properties": {
            "selfSigned": {"type": "object", "additionalProperties": False,
                           "properties": {"crlDistributionPoints": _STRINGS}},
            "ca": {"type": "object", "required": ["secretName"], "additionalProperties": False,
                   "properties": {"secretName": {"type": "string"}, "crlDistributionPoints": _STRINGS,
                                  "issuingCertificateURLs": _STRINGS, "ocspServers": _STRINGS}},
        }}),
    "Certificate": _object("Certificate", {
        "type": "object", "required": ["issuerRef", "secretName"], "additionalProperties": False,
        "properties": {
            "secretName": {"type": "string"},
            "issuerRef": {"type": "object", "required": ["name"], "additionalProperties": False,
                          "properties": {"name": {"type": "string"}, "kind": {"type": "string"},
                                         "group": {"type": "string"}}},
            "commonName": {"type": "string"},
            "subject": {"type": "object", "additionalProperties": False,
                        "properties": {key: _STRINGS for key in (
                            "organizations", "organizationalUnits", "countries", "provinces", "localities",
                            "streetAddresses", "postalCodes")}},
            "dnsNames": _STRINGS, "ipAddresses": _STRINGS, "uris": _STRINGS, "emailAddresses": _STRINGS,
            "usages": {"type": "array", "items": {"enum": USAGES}},
            "isCA": {"type": "boolean"},
            "duration": _DURATION, "renewBefore": _DURATION,
            "privateKey": {"type": "object", "additionalProperties": False, "properties": {
                "algorithm": {"enum": ["RSA", "ECDSA", "Ed25519"]}, "size": {"type": "integer"},
                "encoding": {"enum": ["PKCS1", "PKCS8"]}, "rotationPolicy": {"enum": ["Never", "Always"]}}},
        }}),
}


def is_cert_manager(document: dict[str, Any]) -> bool:
    return str(document.get("apiVersion", "")).startswith("cert-manager.io/")


def validate(document: dict[str, Any]) -> None:
    """jsonschema.ValidationError if `document` is not a cert-manager object of a kind (and with fields)
    this schema knows."""
    schema = SCHEMAS.get(document.get("kind", ""))
    if schema is None:
        raise jsonschema.ValidationError(f"{document.get('kind')!r}: no schema for this cert-manager kind")
    jsonschema.validate(document, schema)


# -- issuing as cert-manager would ----------------------------------------------------------------------

_KEY_USAGES = {"digital signature": "digital_signature", "signing": "digital_signature",
               "content commitment": "content_commitment", "key encipherment": "key_encipherment",
               "key agreement": "key_agreement", "data encipherment": "data_encipherment",
               "cert sign": "key_cert_sign", "crl sign": "crl_sign"}
_EXTENDED = {"server auth": ExtendedKeyUsageOID.SERVER_AUTH, "client auth": ExtendedKeyUsageOID.CLIENT_AUTH}


def _duration(text: str) -> datetime.timedelta:
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
    return datetime.timedelta(seconds=sum(float(n) * units[u] for n, u in re.findall(r"([0-9.]+)(ms|h|m|s)", text)))


def issue_secret(certificate: dict[str, Any], issuer: dict[str, Any],
                 secrets: dict[str, dict[str, bytes]]) -> dict[str, bytes]:
    """The data of the Secret cert-manager writes for `certificate` (a Certificate object), signed as
    `issuer` (an Issuer object: selfSigned, or ca with its Secret in `secrets`): tls.crt, tls.key (an
    ECDSA key in cert-manager's default PKCS1 encoding, i.e. SEC1 for EC) and ca.crt."""
    validate(certificate)
    validate(issuer)
    spec = certificate["spec"]
    key = ec.generate_private_key(ec.SECP256R1())
    attributes = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, o) for o in spec.get("subject", {}).get(
        "organizations", [])]
    if spec.get("commonName"):
        attributes.append(x509.NameAttribute(NameOID.COMMON_NAME, spec["commonName"]))
    subject = x509.Name(attributes)
    if "selfSigned" in issuer["spec"]:
        signer_key, issuer_name, ca_pem = key, subject, None
    else:
        ca_secret = secrets[issuer["spec"]["ca"]["secretName"]]
        ca_certificate = x509.load_pem_x509_certificate(ca_secret["tls.crt"])
        signer_key = serialization.load_pem_private_key(ca_secret["tls.key"], password=None)
        issuer_name, ca_pem = ca_certificate.subject, ca_secret["tls.crt"]
    now = datetime.datetime.now(datetime.timezone.utc)
    usages = spec.get("usages", ["digital signature", "key encipherment"])
    flags = {name: False for name in ("digital_signature", "content_commitment", "key_encipherment",
                                      "data_encipherment", "key_agreement", "key_cert_sign", "crl_sign",
                                      "encipher_only", "decipher_only")}
    for usage in usages:
        if usage in _KEY_USAGES:
            flags[_KEY_USAGES[usage]] = True
    if spec.get("isCA"):
        flags["key_cert_sign"] = True
    builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer_name).public_key(key.public_key())
               .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + _duration(spec.get("duration", "2160h")))
               .add_extension(x509.BasicConstraints(ca=bool(spec.get("isCA")), path_length=None), critical=True)
               .add_extension(x509.KeyUsage(**flags), critical=True))
    extended = [_EXTENDED[u] for u in usages if u in _EXTENDED]
    if extended:
        builder = builder.add_extension(x509.ExtendedKeyUsage(extended), critical=False)
    names = [x509.DNSName(n) for n in spec.get("dnsNames", [])] + \
        [x509.IPAddress(ipaddress.ip_address(a)) for a in spec.get("ipAddresses", [])]
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    certificate_pem = builder.sign(signer_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                                serialization.NoEncryption())
    return {"tls.crt": certificate_pem, "tls.key": key_pem, "ca.crt": ca_pem or certificate_pem}


def issue_all(objects: list[dict[str, Any]]) -> dict[str, dict[str, bytes]]:
    """Every Certificate's Secret (by Secret name), in the order cert-manager can issue them (an issuer's
    CA Secret first)."""
    issuers = {o["metadata"]["name"]: o for o in objects if is_cert_manager(o) and o["kind"] == "Issuer"}
    pending = [o for o in objects if is_cert_manager(o) and o["kind"] == "Certificate"]
    secrets: dict[str, dict[str, bytes]] = {}
    while pending:
        ready = [c for c in pending if "ca" not in issuers[c["spec"]["issuerRef"]["name"]]["spec"]
                 or issuers[c["spec"]["issuerRef"]["name"]]["spec"]["ca"]["secretName"] in secrets]
        if not ready:
            raise ValueError(f"no issuer can sign {[c['metadata']['name'] for c in pending]}")
        for certificate in ready:
            issuer = issuers[certificate["spec"]["issuerRef"]["name"]]
            secrets[certificate["spec"]["secretName"]] = issue_secret(certificate, issuer, secrets)
            pending.remove(certificate)
    return secrets
