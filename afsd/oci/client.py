"""The registry client: resolve an image reference to verified metadata, and download its blobs.

First stage of the data flow: `resolve` turns `host/repo:tag` + a platform into a `ResolvedImage`
(manifest, config, layer descriptors), and `fetch_blob` streams one layer to disk, checking its
digest as it goes; the erofs converter then takes the file. Every byte is verified against a digest
(manifests by tag against Docker-Content-Digest when the registry sends one).

What was verified once is not fetched again (`metadata_cache.py`): resolving a tag again costs one
manifest request, resolving by digest what a tag already led to costs none, and an image config comes
from the cache, then from the `ConfigSource`s the caller gave (the cluster), and only then the registry.

Each request goes to the configured mirrors first, in order, then to the registry itself; any
failure on a mirror (refused, 5xx, 404, bad digest, ...) moves on to the next. Plain HTTP is used
only for hosts listed as insecure, also after redirects. Authentication lives in `auth.py`,
retrying in `_retry.py`.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Protocol, TypeVar

import httpx

from afsd.errors import (
    AfsdError,
    DigestMismatchError,
    NotFoundError,
    PlatformNotFoundError,
    RegistryError,
)
from afsd.fsutil import fsync_directory
from afsd.oci import mediatypes
from afsd.oci._retry import RetryableStatus, should_retry, with_retries
from afsd.oci.auth import Authenticator, registry_error_code
from afsd.oci.config import RegistryConfig
from afsd.oci.digest import (
    Digester,
    digest_algorithm,
    digest_bytes,
    is_blob,
    parse_digest,
    verify_bytes,
)
from afsd.oci.manifest import (
    MAX_CONFIG_SIZE,
    MAX_MANIFEST_SIZE,
    Descriptor,
    ImageConfig,
    ImageIndex,
    Manifest,
    ManifestFormatError,
    parse_image_config,
    parse_manifest,
    select_platform,
)
from afsd.oci.metadata_cache import MetadataCache
from afsd.oci.platform import Platform
from afsd.oci.reference import ImageReference

T = TypeVar("T")

USER_AGENT = "afsd/0.1"
# An index may point at another index; more than this many levels is not an image.
_MAX_INDEX_DEPTH = 3
_BLOB_CHUNK = 1024 * 1024
_ERROR_BODY_LIMIT = 64 * 1024


@dataclass(frozen=True)
class ResolvedImage:
    """An image reference resolved, for one platform, to verified metadata."""

    reference: ImageReference  # as requested, normalised
    platform: Platform  # the platform actually selected
    manifest_digest: str  # digest of the platform-specific manifest
    manifest_media_type: str
    index_digest: str | None  # digest of the index/list it was chosen from, if any
    config_digest: str
    config: ImageConfig
    layers: list[Descriptor]  # bottom to top
    config_blob: bytes = b""  # the config's bytes, as verified against config_digest


class ConfigSource(Protocol):
    """Somewhere an image config may already be, other than the registry (e.g. the cluster's layerstores)."""

    async def fetch_config(self, digest: str, size: int, layer_digests: list[str]) -> bytes | None:
        """The config blob `digest` (of the image with these layers), or None. The caller verifies it."""


@dataclass(frozen=True)
class _Endpoint:
    """One server that can answer for a registry: a mirror, or the registry itself."""

    host: str
    scheme: str
    is_mirror: bool

    def url(self, repository: str, kind: str, reference: str) -> str:
        return f"{self.scheme}://{self.host}/v2/{repository}/{kind}/{reference}"


def _same_origin(a: httpx.URL, b: httpx.URL) -> bool:
    return (a.scheme, a.host, a.port) == (b.scheme, b.host, b.port)


async def _read_capped(response: httpx.Response, limit: int, subject: str) -> bytes:
    declared = response.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise ManifestFormatError(f"{subject} is {declared} bytes, more than the {limit} afsd accepts")
    body = bytearray()
    async for chunk in response.aiter_bytes():
        body += chunk
        if len(body) > limit:
            raise ManifestFormatError(f"{subject} is more than the {limit} bytes afsd accepts")
    return bytes(body)


async def _error_body(response: httpx.Response) -> bytes:
    try:
        return await _read_capped(response, _ERROR_BODY_LIMIT, "error body")
    except (AfsdError, httpx.HTTPError):
        return b""


class _BlobFile:
    """A `.partial` file that hashes what is written to it; all disk work happens in a thread."""

    def __init__(self, path: Path, algorithm: str) -> None:
        self.path = path
        self.digester = Digester(algorithm)
        self._file: IO[bytes] | None = None

    async def __aenter__(self) -> "_BlobFile":
        self._file = await asyncio.to_thread(open, self.path, "wb")
        return self

    def _write(self, chunk: bytes) -> None:
        assert self._file is not None
        self.digester.update(chunk)  # hashlib releases the GIL on large chunks
        self._file.write(chunk)

    async def write(self, chunk: bytes) -> None:
        await asyncio.to_thread(self._write, chunk)

    def _sync(self) -> None:
        assert self._file is not None
        self._file.flush()
        os.fsync(self._file.fileno())

    async def sync(self) -> None:
        await asyncio.to_thread(self._sync)

    async def __aexit__(self, *exc: object) -> None:
        if self._file is not None:
            await asyncio.to_thread(self._file.close)


def _remove_if_present(path: Path) -> None:
    path.unlink(missing_ok=True)


class RegistryClient:
    """Talks to OCI registries over HTTP(S). Use as `async with RegistryClient(config) as client:`."""

    def __init__(self, config: RegistryConfig | None = None, *, metadata: MetadataCache | None = None,
                 config_sources: tuple[ConfigSource, ...] = ()) -> None:
        self.config = config or RegistryConfig()
        self.metadata = metadata if metadata is not None else MetadataCache()
        self.config_sources = config_sources
        self._http = httpx.AsyncClient(
            timeout=httpx.Timeout(self.config.read_timeout, connect=self.config.connect_timeout),
            headers={"User-Agent": USER_AGENT},
            event_hooks={"request": [self._refuse_plain_http]},
        )
        self._auth = Authenticator(self._http, self.config)
        self._credentials_loaded = False

    async def __aenter__(self) -> "RegistryClient":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._auth.aclose()
        await self._http.aclose()

    # -- public API -------------------------------------------------------------------------

    async def resolve(self, ref: ImageReference, platform: Platform) -> ResolvedImage:
        """Fetch and verify the manifest (choosing `platform` from an index) and the image config."""
        return await self._on_each_endpoint(ref, lambda endpoint: self._resolve_on(endpoint, ref, platform))

    async def fetch_blob(self, ref: ImageReference, descriptor: Descriptor, dest: Path, *,
                         progress: Callable[[int], None] | None = None) -> None:
        """Download a blob of `ref`'s repository to `dest`, verifying size and digest as it streams.

        The bytes go to `dest.partial`, are fsynced, and are renamed to `dest` only once verified;
        on any failure the partial file is removed. Callers must not fetch to the same `dest`
        concurrently. `progress` hears the bytes downloaded so far (from 0 again when a retry restarts).
        """
        parse_digest(descriptor.digest)  # never let an unchecked digest into a URL
        partial = dest.with_name(dest.name + ".partial")
        await asyncio.to_thread(dest.parent.mkdir, parents=True, exist_ok=True)
        try:
            await self._on_each_endpoint(
                ref, lambda endpoint: self._fetch_blob_from(endpoint, ref, descriptor, partial, progress))
            await asyncio.to_thread(os.replace, partial, dest)
            await asyncio.to_thread(fsync_directory, dest.parent)
        except BaseException:
            await asyncio.shield(asyncio.to_thread(_remove_if_present, partial))
            raise

    # -- endpoints and mirrors ------------------------------------------------------------------

    def _endpoints(self, ref: ImageReference) -> list[_Endpoint]:
        hosts = [(host, True) for host in self.config.mirrors_for(ref.registry)]
        hosts.append((ref.api_host, False))
        return [_Endpoint(host, "http" if self.config.is_insecure(host) else "https", is_mirror)
                for host, is_mirror in hosts]

    async def _on_each_endpoint(self, ref: ImageReference,
                                operation: Callable[[_Endpoint], Awaitable[T]]) -> T:
        if not self._credentials_loaded:
            await asyncio.to_thread(self.config.load_docker_config)
            self._credentials_loaded = True
        mirror_failures: list[str] = []
        for endpoint in self._endpoints(ref):
            try:
                return await operation(endpoint)
            except AfsdError as exc:
                if endpoint.is_mirror:
                    mirror_failures.append(f"mirror {endpoint.host}: {exc}")
                    continue
                if mirror_failures:
                    raise type(exc)(f"{exc} (after mirrors failed: {'; '.join(mirror_failures)})") from exc
                raise
        raise AssertionError("unreachable: the registry itself is always the last endpoint")

    async def _refuse_plain_http(self, request: httpx.Request) -> None:
        # Runs for every request, redirects included: plain HTTP only where the user allowed it.
        if request.url.scheme == "http" and not self.config.is_insecure(request.url.netloc.decode()):
            host = request.url.netloc.decode()
            raise RegistryError(
                f"refusing plain HTTP to {host} (http://{host}{request.url.path}): allow it with "
                f"--insecure-registry {host}")

    # -- requests -------------------------------------------------------------------------------

    @asynccontextmanager
    async def _get(self, endpoint: _Endpoint, ref: ImageReference, url: str, *, subject: str,
                   not_found: str, headers: dict[str, str]) -> AsyncIterator[httpx.Response]:
        """GET `url` as `ref`'s repository allows, answering one auth challenge; yields a 2xx
        streaming response, raises the matching AfsdError (or RetryableStatus) otherwise."""
        scope = f"repository:{ref.repository}:pull"
        sent = self._auth.authorization(endpoint.host, scope)
        for round_trip in range(2):
            request = self._http.build_request("GET", url, headers=headers)
            if sent:
                request.headers["Authorization"] = sent
            response = await self._http.send(request, stream=True, follow_redirects=True)
            # Only the registry's own challenge is ours to answer, not one from a redirect target.
            if round_trip == 0 and response.status_code == 401 and _same_origin(response.url, request.url):
                await response.aclose()
                sent = await self._auth.answer_challenge(endpoint.host, scope, response, sent)
                continue
            break
        try:
            status = response.status_code
            if 200 <= status < 300:
                yield response
                return
            if should_retry(status):
                raise RetryableStatus(response, subject)
            body = await _error_body(response)
            if not _same_origin(response.url, request.url):
                raise RegistryError(f"{response.url.netloc.decode()}, where registry {endpoint.host} redirected "
                                    f"the request for {subject}, answered HTTP {status}")
            if status in (401, 403):
                raise self._auth.rejected(endpoint.host, scope, status, body, sent)
            if status == 404:
                raise NotFoundError(f"{not_found} on {endpoint.host}{registry_error_code(body)}")
            raise RegistryError(f"registry {endpoint.host} answered HTTP {status} for {subject}"
                                f"{registry_error_code(body)}")
        finally:
            await response.aclose()

    async def _retrying(self, endpoint: _Endpoint, operation: Callable[[], Awaitable[T]]) -> T:
        return await with_retries(operation, host=endpoint.host, what="registry",
                                  attempts=self.config.max_attempts, backoff_base=self.config.backoff_base)

    async def _manifest(self, endpoint: _Endpoint, ref: ImageReference, reference: str,
                        expected: Descriptor | None) -> tuple[bytes, str, str]:
        """Raw manifest, its Content-Type and its verified digest: from the cache for a digest seen
        before in this repository, else from `endpoint` (and then kept)."""
        repository = f"{ref.registry}/{ref.repository}"
        if reference.startswith(("sha256:", "sha512:")):
            known = self.metadata.manifest(repository, reference)
            if known is not None and (expected is None or len(known[0]) == expected.size):
                return known[0], known[1], reference
        raw, content_type, digest = await self._fetch_manifest(endpoint, ref, reference, expected)
        self.metadata.add_manifest(repository, digest, raw, content_type)
        return raw, content_type, digest

    async def _fetch_manifest(self, endpoint: _Endpoint, ref: ImageReference, reference: str,
                              expected: Descriptor | None) -> tuple[bytes, str, str]:
        """Raw manifest, its Content-Type and its verified digest."""
        pinned = reference.startswith(("sha256:", "sha512:"))
        shown = f"{ref.name}@{reference}" if pinned else f"{ref.name}:{reference}"
        subject = f"manifest {shown}"

        async def attempt() -> tuple[bytes, str, str | None]:
            async with self._get(endpoint, ref, endpoint.url(ref.repository, "manifests", reference),
                                 subject=subject, not_found=f"image {shown} not found",
                                 headers={"Accept": mediatypes.MANIFEST_ACCEPT}) as response:
                raw = await _read_capped(response, MAX_MANIFEST_SIZE, f"{subject} from {endpoint.host}")
                return raw, response.headers.get("content-type", ""), response.headers.get("docker-content-digest")

        raw, content_type, header_digest = await self._retrying(endpoint, attempt)
        what = f"{subject} from {endpoint.host}"
        if expected is not None and len(raw) != expected.size:
            raise DigestMismatchError(f"{what} is {len(raw)} bytes, but its index says {expected.size}")
        if pinned:
            verify_bytes(raw, reference, what=what)
            return raw, content_type, reference
        if header_digest:
            try:
                header_digest = parse_digest(header_digest.strip())
            except AfsdError:
                raise ManifestFormatError(
                    f"{what} came with an invalid Docker-Content-Digest {header_digest!r}") from None
            verify_bytes(raw, header_digest, what=what)
            return raw, content_type, header_digest
        return raw, content_type, digest_bytes(raw)

    async def _config(self, endpoint: _Endpoint, ref: ImageReference, manifest: Manifest) -> bytes:
        """The image config: from the cache, else a config source, else `endpoint`; kept afterwards."""
        descriptor = manifest.config
        raw = await self.metadata.config(descriptor.digest)
        if raw is not None and len(raw) == descriptor.size:
            return raw
        layer_digests = [layer.digest for layer in manifest.layers]
        sources = self.config_sources if descriptor.size <= MAX_CONFIG_SIZE else ()  # else: refused below
        for source in sources:
            candidate = await source.fetch_config(descriptor.digest, descriptor.size, layer_digests)
            if candidate is not None and is_blob(candidate, descriptor.digest, descriptor.size):
                raw = candidate
                break
        else:
            raw = await self._fetch_config(endpoint, ref, descriptor)
        await self.metadata.add_config(descriptor.digest, raw)
        return raw

    async def _fetch_config(self, endpoint: _Endpoint, ref: ImageReference, descriptor: Descriptor) -> bytes:
        subject = f"config blob {descriptor.digest} of {ref.name}"
        what = f"{subject} from {endpoint.host}"
        if descriptor.size > MAX_CONFIG_SIZE:
            raise ManifestFormatError(
                f"{what} is {descriptor.size} bytes, more than the {MAX_CONFIG_SIZE} afsd accepts")

        async def attempt() -> bytes:
            async with self._get(endpoint, ref, endpoint.url(ref.repository, "blobs", descriptor.digest),
                                 subject=subject, not_found=f"{subject} not found",
                                 headers={"Accept-Encoding": "identity"}) as response:
                return await _read_capped(response, descriptor.size, what)

        raw = await self._retrying(endpoint, attempt)
        if len(raw) != descriptor.size:
            raise DigestMismatchError(f"{what} is {len(raw)} bytes, but its manifest says {descriptor.size}")
        verify_bytes(raw, descriptor.digest, what=what)
        return raw

    async def _fetch_blob_from(self, endpoint: _Endpoint, ref: ImageReference, descriptor: Descriptor,
                               partial: Path, progress: Callable[[int], None] | None) -> None:
        subject = f"blob {descriptor.digest} of {ref.name}"
        what = f"{subject} from {endpoint.host}"

        async def attempt() -> None:
            async with self._get(endpoint, ref, endpoint.url(ref.repository, "blobs", descriptor.digest),
                                 subject=subject, not_found=f"{subject} not found",
                                 headers={"Accept-Encoding": "identity"}) as response:
                async with _BlobFile(partial, digest_algorithm(descriptor.digest)) as blob:
                    async for chunk in response.aiter_bytes(_BLOB_CHUNK):
                        await blob.write(chunk)
                        if progress is not None:
                            progress(blob.digester.size)
                        if blob.digester.size > descriptor.size:
                            raise DigestMismatchError(
                                f"{what} is larger than the {descriptor.size} bytes its manifest says")
                    await blob.sync()
            if blob.digester.size != descriptor.size:
                raise DigestMismatchError(
                    f"{what} is {blob.digester.size} bytes, but its manifest says {descriptor.size}")
            if blob.digester.digest != descriptor.digest:
                raise DigestMismatchError(
                    f"{what} does not match its digest: the content hashes to {blob.digester.digest}")

        await self._retrying(endpoint, attempt)

    # -- resolving --------------------------------------------------------------------------------

    async def _resolve_on(self, endpoint: _Endpoint, ref: ImageReference, platform: Platform) -> ResolvedImage:
        raw, content_type, digest = await self._manifest(endpoint, ref, ref.manifest_reference, None)
        document = parse_manifest(raw, content_type, source=f"manifest of {ref} from {endpoint.host}")
        index_digest: str | None = None
        selected: Platform | None = None
        for _ in range(_MAX_INDEX_DEPTH):
            if not isinstance(document, ImageIndex):
                break
            index_digest = index_digest or digest
            descriptor = select_platform(document, platform, image=f"image {ref}")
            selected = descriptor.platform
            raw, content_type, digest = await self._manifest(endpoint, ref, descriptor.digest, descriptor)
            document = parse_manifest(raw, content_type or descriptor.media_type,
                                      source=f"manifest {descriptor.digest} of {ref.name} from {endpoint.host}")
        if not isinstance(document, Manifest):
            raise ManifestFormatError(f"image {ref} nests indexes more than {_MAX_INDEX_DEPTH} deep")

        config_raw = await self._config(endpoint, ref, document)
        config = parse_image_config(config_raw, source=f"image config of {ref}")
        if selected is None:
            # A single-platform image: make sure it is the platform that was asked for.
            if config.os and config.architecture and not platform.matches(config.platform):
                raise PlatformNotFoundError(
                    f"image {ref} is only available for {config.platform}, not {platform} "
                    "(choose a platform with --platform)")
            selected = config.platform if config.os and config.architecture else platform
        if len(config.diff_ids) != len(document.layers):
            raise ManifestFormatError(
                f"image {ref} is inconsistent: its manifest lists {len(document.layers)} layers but its "
                f"config {len(config.diff_ids)} diff_ids")
        return ResolvedImage(reference=ref, platform=selected, manifest_digest=digest,
                             manifest_media_type=document.media_type, index_digest=index_digest,
                             config_digest=document.config.digest, config=config, layers=list(document.layers),
                             config_blob=config_raw)
