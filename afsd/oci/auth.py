"""Registry authentication: answering 401 challenges with HTTP basic or bearer tokens.

The registry client sends a request with whatever `Authenticator.authorization` already knows for
that host (a cached token, or basic credentials once the host asked for them). On a 401 it calls
`answer_challenge`, which reads WWW-Authenticate and returns the header to retry with:

- `Basic`: the credentials of exactly the host being contacted, or an error saying how to log in.
- `Bearer realm=... service=... scope=...`: a token from the realm (Docker's token protocol),
  fetched with the host's basic credentials, or by exchanging its identity token (OAuth2
  refresh-token grant), or anonymously. Tokens are cached per (host, scope) until they expire
  (`expires_in`, default 60 s, counted from `issued_at`), and concurrent requests that need the same
  token share ONE fetch.

Credentials never leave for another host: they are looked up by the host contacted, httpx drops
Authorization on cross-origin redirects, and the token realm only gets them over HTTPS or when the
user listed its host with --insecure-registry.
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

import httpx

from afsd.errors import RegistryAuthError
from afsd.oci._retry import RetryableStatus, should_retry, with_retries
from afsd.oci.config import Credential, RegistryConfig

DEFAULT_TOKEN_LIFETIME = 60.0
# Stop using a token this long before it expires, so it does not lapse in flight.
EXPIRY_MARGIN = 5.0
_MAX_TOKEN_RESPONSE = 1024 * 1024

_AUTH_PARAM = re.compile(r'\s*([!#$%&\'*+.^_`|~0-9A-Za-z-]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^,\s]*)\s*(?:,|$)')
_SCHEME = re.compile(r"\s*,*\s*([!#$%&'*+.^_`|~0-9A-Za-z-]+)(?:\s+|$)")


@dataclass(frozen=True)
class Challenge:
    """One challenge of a WWW-Authenticate header: `scheme` lower-cased, parameter names too."""

    scheme: str
    params: dict[str, str]


def parse_www_authenticate(values: list[str]) -> list[Challenge]:
    """Parse WWW-Authenticate header values (RFC 7235), e.g. `Bearer realm="...",service="..."`."""
    challenges: list[Challenge] = []
    for value in values:
        position = 0
        while position < len(value):
            scheme = _SCHEME.match(value, position)
            if not scheme:
                break
            position = scheme.end()
            params: dict[str, str] = {}
            while position < len(value):
                param = _AUTH_PARAM.match(value, position)
                if not param:
                    break
                raw = param.group(2)
                if raw.startswith('"'):
                    raw = re.sub(r"\\(.)", r"\1", raw[1:-1])
                params[param.group(1).lower()] = raw
                position = param.end()
            challenges.append(Challenge(scheme.group(1).lower(), params))
    return challenges


def _basic_header(credential: Credential) -> str:
    pair = f"{credential.username}:{credential.password}".encode()
    return "Basic " + base64.b64encode(pair).decode()


def _parse_issued_at(value: object) -> float | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        return datetime.fromisoformat(value).timestamp()
    except ValueError:
        return None


class TokenCache:
    """Bearer tokens by (host, scope), each dropped when its lifetime is over."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._tokens: dict[tuple[str, str], tuple[str, float]] = {}

    def get(self, key: tuple[str, str]) -> str | None:
        entry = self._tokens.get(key)
        if entry is None:
            return None
        token, expires_at = entry
        if self._clock() >= expires_at - EXPIRY_MARGIN:
            del self._tokens[key]
            return None
        return token

    def put(self, key: tuple[str, str], token: str, *, expires_in: float | None = None,
            issued_at: float | None = None) -> None:
        now = self._clock()
        # A server clock ahead of ours must not stretch the lifetime; one behind shortens it.
        start = min(now, issued_at) if issued_at is not None else now
        self._tokens[key] = (token, start + (expires_in or DEFAULT_TOKEN_LIFETIME))

    def invalidate(self, key: tuple[str, str], token: str) -> None:
        if self._tokens.get(key, ("",))[0] == token:
            del self._tokens[key]


class Authenticator:
    """Authorization headers for registry hosts; one per RegistryClient (it owns the token cache)."""

    def __init__(self, http: httpx.AsyncClient, config: RegistryConfig, *,
                 clock: Callable[[], float] = time.time) -> None:
        self._http = http
        self._config = config
        self.tokens = TokenCache(clock)
        self._inflight: dict[tuple[str, str], asyncio.Task[str]] = {}
        self._basic_hosts: set[str] = set()

    def authorization(self, host: str, scope: str) -> str | None:
        """The header to send up front: basic for hosts known to want it, else a cached token."""
        if host in self._basic_hosts:
            credential = self._config.credential_for(host)
            if credential is not None and credential.username:
                return _basic_header(credential)
        token = self.tokens.get((host, scope))
        return f"Bearer {token}" if token else None

    async def answer_challenge(self, host: str, scope: str, response: httpx.Response,
                               sent: str | None) -> str:
        """The Authorization header to retry a request that got `response` (a 401) with.

        `sent` is the header the rejected request carried. Raises RegistryAuthError when there is
        nothing better to try.
        """
        challenges = parse_www_authenticate(response.headers.get_list("www-authenticate"))
        bearer = next((c for c in challenges if c.scheme == "bearer" and c.params.get("realm")), None)
        if bearer is not None:
            key = (host, bearer.params.get("scope") or scope)
            if sent and sent.startswith("Bearer "):
                self.tokens.invalidate(key, sent.removeprefix("Bearer "))
            token = self.tokens.get(key) or await self._single_flight(key, bearer)
            return f"Bearer {token}"
        if any(c.scheme == "basic" for c in challenges):
            credential = self._config.credential_for(host)
            if credential is None or not credential.username:
                raise RegistryAuthError(
                    f"registry {host} requires a login: pass --registry-auth {host}=USER:PASSWORD "
                    "or add it to the Docker config")
            header = _basic_header(credential)
            if sent == header:
                raise self.rejected(host, scope, response.status_code, b"", sent)
            self._basic_hosts.add(host)
            return header
        schemes = ", ".join(c.scheme for c in challenges) or "none"
        raise RegistryAuthError(f"registry {host} asks for an unsupported authentication scheme ({schemes})")

    def rejected(self, host: str, scope: str, status: int, body: bytes, sent: str | None) -> RegistryAuthError:
        """The error for a request still refused (401/403, error `body`) after we authenticated
        as well as we can."""
        credential = self._config.credential_for(host)
        repository = scope.split(":")[1] if scope.count(":") >= 2 else scope
        detail = f"HTTP {status}{registry_error_code(body)}"
        if credential is None or credential == Credential():
            return RegistryAuthError(
                f"registry {host} refused anonymous access to {repository} ({detail}): pass "
                f"--registry-auth {host}=USER:PASSWORD or add it to the Docker config")
        who = f"user {credential.username!r}" if credential.username else "the identity token"
        if sent and sent.startswith("Basic ") and status == 401:
            return RegistryAuthError(
                f"registry {host} rejected the credentials of {who} ({detail}): check --registry-auth "
                "or the Docker config")
        return RegistryAuthError(f"registry {host} denied {who} access to {repository} ({detail})")

    async def _single_flight(self, key: tuple[str, str], challenge: Challenge) -> str:
        # The fetch runs as its own task: a caller that is cancelled must not cancel it for the others.
        task = self._inflight.get(key)
        if task is None:
            task = asyncio.create_task(self._fetch_token(key, challenge), name=f"token for {key[0]}")
            self._inflight[key] = task
            task.add_done_callback(lambda done: self._token_fetched(key, done))
        return await asyncio.shield(task)

    def _token_fetched(self, key: tuple[str, str], task: asyncio.Task[str]) -> None:
        if self._inflight.get(key) is task:
            del self._inflight[key]
        if not task.cancelled():
            task.exception()  # mark retrieved: every waiter got it already, or there were none

    async def aclose(self) -> None:
        for task in list(self._inflight.values()):
            task.cancel()
        await asyncio.gather(*self._inflight.values(), return_exceptions=True)

    async def _fetch_token(self, key: tuple[str, str], challenge: Challenge) -> str:
        host, scope = key
        realm = challenge.params["realm"]
        try:
            url = httpx.URL(realm)
        except httpx.InvalidURL:
            raise RegistryAuthError(f"registry {host} names an invalid token server {realm!r}") from None
        realm_host = url.netloc.decode()
        if url.scheme not in ("http", "https") or not url.host:
            raise RegistryAuthError(f"registry {host} names an invalid token server {realm!r}")
        credential = self._config.credential_for(host)
        if url.scheme == "http" and not self._config.is_insecure(realm_host):
            what = f"the credentials for {host}" if credential else "a token request"
            raise RegistryAuthError(
                f"refusing to send {what} to token server {realm} over plain HTTP: the registry should "
                f"use an https realm, or allow it with --insecure-registry {realm_host}")

        service = challenge.params.get("service", "")
        scopes = scope.split()
        request: dict = {"method": "GET", "url": url, "params": ([("service", service)] if service else [])
                         + [("scope", s) for s in scopes]}
        if credential is not None and credential.token:
            request = {"method": "POST", "url": url, "data": {
                "grant_type": "refresh_token", "refresh_token": credential.token, "client_id": "afsd",
                "service": service, "scope": " ".join(scopes)}}
        elif credential is not None and credential.username:
            request["headers"] = {"Authorization": _basic_header(credential)}

        async def exchange() -> tuple[int, bytes]:
            async with self._http.stream(**request, follow_redirects=True) as response:
                if should_retry(response.status_code):
                    raise RetryableStatus(response, f"a token for {host}")
                body = b""
                async for chunk in response.aiter_bytes():
                    body += chunk
                    if len(body) > _MAX_TOKEN_RESPONSE:
                        raise RegistryAuthError(
                            f"token server {realm_host} of registry {host} sent an oversized answer")
                return response.status_code, body

        status, body = await with_retries(exchange, host=realm_host, what=f"token server of registry {host} at",
                                          attempts=self._config.max_attempts,
                                          backoff_base=self._config.backoff_base)
        if status in (400, 401, 403):
            if credential is None:
                raise RegistryAuthError(
                    f"registry {host} requires a login (its token server answered HTTP {status}): "
                    f"pass --registry-auth {host}=USER:PASSWORD or add it to the Docker config")
            who = f"user {credential.username!r}" if credential.username else "the identity token"
            raise RegistryAuthError(
                f"registry {host} rejected the credentials of {who} (its token server answered HTTP "
                f"{status}): check --registry-auth or the Docker config")
        if status != 200:
            raise RegistryAuthError(f"token server {realm_host} of registry {host} answered HTTP {status}")
        try:
            document = json.loads(body)
        except ValueError:
            document = None
        token = (document.get("token") or document.get("access_token")) if isinstance(document, dict) else None
        if not isinstance(token, str) or not token:
            raise RegistryAuthError(f"token server {realm_host} of registry {host} sent no token")
        expires_in = document.get("expires_in")
        if not isinstance(expires_in, (int, float)) or isinstance(expires_in, bool) or expires_in <= 0:
            expires_in = None
        self.tokens.put(key, token, expires_in=expires_in, issued_at=_parse_issued_at(document.get("issued_at")))
        return token


def registry_error_code(body: bytes) -> str:
    """`, MANIFEST_UNKNOWN: manifest unknown` from a distribution-style error body, or "" if none."""
    try:
        first = json.loads(body)["errors"][0]
        code, message = str(first.get("code") or ""), str(first.get("message") or "")
    except (ValueError, KeyError, IndexError, TypeError, AttributeError):
        return ""
    if code and message:
        return f", {code}: {message}"
    return f", {code or message}" if code or message else ""
