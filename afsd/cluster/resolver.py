"""Image resolution with a cache: reference + platform → manifest digest, layers and runtime config.

Shared by discovery (`ResolveImage`) and the layerstore (`PullImage`). Concurrent resolutions of one
image share a single registry round trip. A tag is re-resolved after `tag_ttl` seconds, so a moved tag
is picked up (the reference AFS cached resolutions until restart); a digest-pinned reference never
changes, so its entry lives until evicted by size.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict

from afsd.cluster.keys import image_key
from afsd.oci.client import RegistryClient, ResolvedImage
from afsd.oci.platform import Platform
from afsd.oci.reference import ImageReference


class ImageResolver:
    def __init__(self, client: RegistryClient, *, tag_ttl: float = 60.0, max_entries: int = 1024) -> None:
        self._client = client
        self._tag_ttl = tag_ttl
        self._max_entries = max_entries
        self._cache: OrderedDict[str, tuple[float, ResolvedImage]] = OrderedDict()
        self._inflight: dict[str, asyncio.Future[ResolvedImage]] = {}

    def cached(self, key: str) -> ResolvedImage | None:
        """The last resolution of `key`, fresh or not (used to list an image's layers)."""
        entry = self._cache.get(key)
        return entry[1] if entry else None

    async def resolve(self, reference: ImageReference, platform: Platform, *,
                      force_refresh: bool = False) -> ResolvedImage:
        key = image_key(reference, platform)
        entry = self._cache.get(key)
        if entry and not force_refresh:
            resolved_at, image = entry
            if reference.digest or time.monotonic() - resolved_at < self._tag_ttl:
                self._cache.move_to_end(key)
                return image
        pending = self._inflight.get(key)
        if pending is None:
            pending = asyncio.ensure_future(self._fetch(key, reference, platform))
            self._inflight[key] = pending
            pending.add_done_callback(lambda _: self._inflight.pop(key, None))
        # shield: one caller giving up must not cancel the fetch the others wait for.
        return await asyncio.shield(pending)

    async def _fetch(self, key: str, reference: ImageReference, platform: Platform) -> ResolvedImage:
        image = await self._client.resolve(reference, platform)
        self._cache[key] = (time.monotonic(), image)
        self._cache.move_to_end(key)
        while len(self._cache) > self._max_entries:
            self._cache.popitem(last=False)
        return image
