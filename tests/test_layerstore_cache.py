"""The layerstore's cache limit: reservations, LRU eviction that spares leased layers, pruning."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest

from afsd.api import layerstore_pb2 as lpb
from afsd.cluster.blobstore import MAX_LEASE_TTL
from tests.support.cluster import LocalCluster, small_image

MIB = 1 << 20
# Three images of ~4 MiB of erofs each; a layer's download reserves ~6.4 MiB. 13 MiB holds two images.
LIMIT = 13 * MIB


async def _present(cluster: LocalCluster, node, image) -> bool:
    response = await cluster.layerstore(node).HasImage(lpb.HasImageRequest(image=image.reference))
    return response.found


async def test_lru_eviction_spares_the_recently_used_and_the_leased(cluster: LocalCluster) -> None:
    (node,) = await cluster.start_layerstores(1, cache_max_bytes=LIMIT)
    images = [await cluster.push(name, small_image(name, 4 * MIB, compression="none")) for name in "abc"]
    a, b, c = images
    stub = cluster.layerstore(node)

    a_digests = [layer.digest for layer in (await cluster.pull(node, a)).layers]
    await asyncio.sleep(1.1)
    await cluster.pull(node, b)
    await asyncio.sleep(1.1)
    await cluster.pull(node, a)          # a is now more recent than b
    await asyncio.sleep(1.1)
    await cluster.pull(node, c)          # room for c must come from b, the least recently used
    assert [await _present(cluster, node, image) for image in images] == [True, False, True]

    # Now a is the least recently used. Leased, it must survive, and c goes instead.
    lease = await stub.AcquireLayerLease(lpb.AcquireLayerLeaseRequest(digests=a_digests, ttl_ms=60_000))
    await asyncio.sleep(1.1)
    await cluster.pull(node, b)
    assert [await _present(cluster, node, image) for image in images] == [True, True, False]
    assert (await stub.ReleaseLayerLease(lpb.ReleaseLayerLeaseRequest(lease_id=lease.lease_id))).released


async def test_leases_need_present_layers_and_a_live_id(cluster: LocalCluster) -> None:
    (node,) = await cluster.start_layerstores(1)
    image = await cluster.push("leased", small_image("leased", MIB))
    digests = [l.digest for l in (await cluster.pull(node, image)).layers]
    stub = cluster.layerstore(node)
    lease = await stub.AcquireLayerLease(lpb.AcquireLayerLeaseRequest(digests=digests + digests[:1]))
    assert list(lease.digests) == digests
    renewed = await stub.RenewLayerLease(lpb.RenewLayerLeaseRequest(lease_id=lease.lease_id, ttl_ms=1000))
    assert renewed.expires_at_unix_ms <= lease.expires_at_unix_ms
    with pytest.raises(grpc.aio.AioRpcError) as missing:
        await stub.AcquireLayerLease(lpb.AcquireLayerLeaseRequest(digests=["sha256:" + "0" * 64]))
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.aio.AioRpcError) as unknown:
        await stub.RenewLayerLease(lpb.RenewLayerLeaseRequest(lease_id="lease-nope"))
    assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
    assert not (await stub.ReleaseLayerLease(lpb.ReleaseLayerLeaseRequest(lease_id="lease-nope"))).released


async def test_an_image_bigger_than_the_cache_fails_at_once_naming_the_sizes(cluster: LocalCluster) -> None:
    (node,) = await cluster.start_layerstores(1, cache_max_bytes=LIMIT)
    huge = await cluster.push("huge", small_image("huge", 16 * MIB, compression="none"))
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await cluster.pull(node, huge)
    assert failure.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert f"{LIMIT:,}" in failure.value.details() and "needs about" in failure.value.details()
    fetched = [e for e in cluster.registry.access_log() if e.method == "GET" and "/blobs/" in e.uri
               and e.uri.rsplit("/", 1)[-1] in {l.digest for l in huge.manifests[0].layers}]
    assert fetched == []  # failed before downloading anything


async def test_prune_cache_reclaims_the_requested_share(cluster: LocalCluster) -> None:
    (node,) = await cluster.start_layerstores(1)
    for name in "xyz":
        await cluster.pull(node, await cluster.push(name, small_image(name, 2 * MIB, compression="none")))
    stub = cluster.layerstore(node)
    result = await stub.PruneCache(lpb.PruneCacheRequest(percent=30))
    assert result.reclaimed_bytes >= 0.3 * result.before_bytes
    assert result.after_bytes == result.before_bytes - result.reclaimed_bytes
    assert result.evicted_layers >= 1
    for percent in (0, -5, 100.5):
        with pytest.raises(grpc.aio.AioRpcError) as bad:
            await stub.PruneCache(lpb.PruneCacheRequest(percent=percent))
        assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_pulls_waiting_for_a_download_slot_hold_no_cache_space(cluster: LocalCluster) -> None:
    """Three pulls at once, one download slot, a cache with room for two: a pull reserves its space only
    once it has the slot, so the two queued behind it are not refused for space they do not use yet;
    all three land (the third evicting the least recently used) and the cache never goes over."""
    (node,) = await cluster.start_layerstores(1, cache_max_bytes=LIMIT, extra_args=["--fetch-concurrency", "1"])
    images = [await cluster.push(f"queued-{name}", small_image(f"queued-{name}", 4 * MIB, compression="none"))
              for name in "xyz"]
    outcomes = await asyncio.gather(*(cluster.pull(node, image) for image in images), return_exceptions=True)
    assert not [o for o in outcomes if isinstance(o, BaseException)], outcomes
    status = await cluster.layerstore(node).PruneCache(lpb.PruneCacheRequest(percent=1))  # reports the totals
    assert status.before_bytes <= LIMIT, status


async def test_a_lease_asked_for_a_year_is_capped(cluster: LocalCluster) -> None:
    (node,) = await cluster.start_layerstores(1)
    image = await cluster.push("capped", small_image("capped", MIB))
    digests = [l.digest for l in (await cluster.pull(node, image)).layers]
    year_ms = 365 * 24 * 3600 * 1000
    lease = await cluster.layerstore(node).AcquireLayerLease(lpb.AcquireLayerLeaseRequest(digests=digests,
                                                                                          ttl_ms=year_ms))
    assert lease.expires_at_unix_ms <= (time.time() + MAX_LEASE_TTL + 5) * 1000
    renewed = await cluster.layerstore(node).RenewLayerLease(lpb.RenewLayerLeaseRequest(lease_id=lease.lease_id,
                                                                                        ttl_ms=year_ms))
    assert renewed.expires_at_unix_ms <= (time.time() + MAX_LEASE_TTL + 5) * 1000


async def test_concurrent_pulls_never_overcommit_the_cache(cluster: LocalCluster) -> None:
    """Three pulls at once into a cache with room for two: reservations are taken before downloading,
    so the cache never goes over its limit; what cannot fit while the others are in progress is refused
    (RESOURCE_EXHAUSTED) without evicting anything, and the same pull works once they are done."""
    (node,) = await cluster.start_layerstores(1, cache_max_bytes=LIMIT)
    images = [await cluster.push(f"burst-{name}", small_image(f"burst-{name}", 4 * MIB, compression="none"))
              for name in "xyz"]
    outcomes = await asyncio.gather(*(cluster.pull(node, image) for image in images), return_exceptions=True)
    refused = [o for o in outcomes if isinstance(o, grpc.aio.AioRpcError)]
    assert all(o.code() == grpc.StatusCode.RESOURCE_EXHAUSTED for o in refused), outcomes
    assert not [o for o in outcomes if isinstance(o, BaseException) and o not in refused], outcomes
    assert len(refused) <= 1
    status = await cluster.layerstore(node).PruneCache(lpb.PruneCacheRequest(percent=1))  # reports the totals
    assert status.before_bytes <= LIMIT, status
    # (A pull that finished first may already have been evicted, least recently used, by a later one.)
    assert any([await _present(cluster, node, image) for image in images])
    for image, outcome in zip(images, outcomes):
        if outcome in refused:           # nothing in progress any more: the refused pull now fits
            await cluster.pull(node, image)
            assert await _present(cluster, node, image)
