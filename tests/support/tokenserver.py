"""A Docker-protocol token server on loopback, for a real `docker-registry` with `auth.token`.

It checks basic credentials (GET, as `docker pull` does) or an identity token (POST, OAuth2
refresh-token grant) and issues RS256 JWTs that distribution 2.8 accepts: the header carries the
signing certificate in `x5c`, and that self-signed certificate is the registry's rootcertbundle.
Anonymous callers get `pull` on repositories under `public/` only (like Docker Hub's public
images). Every request is recorded, so tests can count token fetches.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import secrets
import threading
import time
import urllib.parse
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.x509.oid import NameOID

from afsd.lab.registry import TokenAuth
from tests.support.httpserver import BackgroundHTTPServer

SERVICE = "afsd-test-registry"
ISSUER = "afsd-test-token-issuer"
PUBLIC_PREFIX = "public/"


@dataclass(frozen=True)
class TokenRequest:
    """One request the token server answered."""

    method: str
    account: str | None  # who authenticated; None for anonymous
    sent_credentials: bool  # an Authorization header or a refresh token came with it
    scopes: tuple[str, ...]
    status: int


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _signing_identity() -> tuple[rsa.RSAPrivateKey, x509.Certificate]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, ISSUER)])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1)).not_valid_after(now + dt.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False, key_agreement=False,
                                         crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
            .sign(key, hashes.SHA256()))
    return key, cert


class TokenServer(BackgroundHTTPServer):
    """Start with `start()` (or as a context manager); `realm` is what the registry points clients at."""

    def __init__(self, root: Path, *, users: dict[str, str], refresh_tokens: dict[str, str] | None = None,
                 expires_in: int = 300, delay: float = 0.0) -> None:
        self.users = dict(users)
        self.refresh_tokens = dict(refresh_tokens or {})  # identity token -> account
        self.expires_in = expires_in
        # Hold each answer back a little so concurrent clients really overlap (single-flight tests).
        self.delay = delay
        self._key, cert = _signing_identity()
        self._cert_der = cert.public_bytes(serialization.Encoding.DER)
        root.mkdir(parents=True, exist_ok=True)
        self.cert_path = root / "token-signing-cert.pem"
        self.cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        self._lock = threading.Lock()
        self._requests: list[TokenRequest] = []
        super().__init__(self._handler_class())

    @property
    def realm(self) -> str:
        return f"http://{self.address}/token"

    def token_auth(self) -> TokenAuth:
        """The registry's `auth.token` settings that trust this server."""
        return TokenAuth(realm=self.realm, service=SERVICE, issuer=ISSUER, root_cert_bundle=self.cert_path)

    @property
    def requests(self) -> list[TokenRequest]:
        with self._lock:
            return list(self._requests)

    # -- token issuing ------------------------------------------------------------------------

    def _grant(self, account: str | None, scopes: list[str]) -> list[dict]:
        access = []
        for scope in scopes:
            kind, _, rest = scope.partition(":")
            name, _, actions = rest.rpartition(":")
            wanted = [a for a in actions.split(",") if a]
            if account is None:
                wanted = [a for a in wanted if a == "pull" and name.startswith(PUBLIC_PREFIX)]
            if kind and name and wanted:
                access.append({"type": kind, "name": name, "actions": wanted})
        return access

    def _issue(self, account: str | None, scopes: list[str], service: str) -> tuple[str, int]:
        now = int(time.time())
        header = {"typ": "JWT", "alg": "RS256", "x5c": [base64.b64encode(self._cert_der).decode()]}
        claims = {"iss": ISSUER, "sub": account or "", "aud": service, "exp": now + self.expires_in,
                  "nbf": now - 5, "iat": now, "jti": secrets.token_hex(8),
                  "access": self._grant(account, scopes)}
        signing_input = f"{_b64url(json.dumps(header).encode())}.{_b64url(json.dumps(claims).encode())}"
        signature = self._key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
        return f"{signing_input}.{_b64url(signature)}", now

    def _answer(self, method: str, headers: dict[str, str], query: dict[str, list[str]],
                form: dict[str, list[str]]) -> tuple[int, dict]:
        """Status and JSON body for one token request; records it."""
        account: str | None = None
        status = 200
        sent = False
        if method == "GET":
            scopes = query.get("scope", [])
            service = (query.get("service") or [SERVICE])[0]
            authorization = headers.get("authorization", "")
            if authorization:
                sent = True
                user, password = "", None
                if authorization.startswith("Basic "):
                    try:
                        user, _, password = base64.b64decode(authorization[6:]).decode().partition(":")
                    except ValueError:
                        pass
                if password is not None and self.users.get(user) == password:
                    account = user
                else:
                    status = 401
        else:
            scopes = " ".join(form.get("scope", [])).split()
            service = (form.get("service") or [SERVICE])[0]
            sent = True
            if (form.get("grant_type") or [""])[0] == "refresh_token":
                account = self.refresh_tokens.get((form.get("refresh_token") or [""])[0])
            elif (form.get("grant_type") or [""])[0] == "password":
                user, password = (form.get("username") or [""])[0], (form.get("password") or [""])[0]
                account = user if self.users.get(user) == password else None
            if account is None:
                status = 401
        with self._lock:
            self._requests.append(TokenRequest(method, account, sent, tuple(scopes), status))
        if status != 200:
            return status, {"errors": [{"code": "UNAUTHORIZED", "message": "authentication required"}]}
        token, issued = self._issue(account, scopes, service)
        issued_at = dt.datetime.fromtimestamp(issued, dt.timezone.utc).isoformat().replace("+00:00", "Z")
        # Docker's token protocol answers `token`; OAuth2 (the POST form) answers `access_token`.
        field = "token" if method == "GET" else "access_token"
        return 200, {field: token, "expires_in": self.expires_in, "issued_at": issued_at}

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def _serve(self, method: str) -> None:
                url = urllib.parse.urlsplit(self.path)
                if url.path != "/token":
                    self.send_error(404)
                    return
                length = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(length).decode() if length else ""
                if server.delay:
                    time.sleep(server.delay)
                status, document = server._answer(
                    method, {k.lower(): v for k, v in self.headers.items()},
                    urllib.parse.parse_qs(url.query), urllib.parse.parse_qs(body))
                payload = json.dumps(document).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def do_GET(self) -> None:  # noqa: N802 (http.server naming)
                self._serve("GET")

            def do_POST(self) -> None:  # noqa: N802
                self._serve("POST")

            def log_message(self, format: str, *args: object) -> None:
                pass

        return Handler
