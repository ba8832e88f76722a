"""`afsd node` + `afsd mount` with the fscache backend, inside the lab VM, as a user runs them: a
multi-layer image mounted through erofs in fscache mode is the tree umoci unpacks from the same
registry, and where fanotify is unavailable (this 6.12 kernel) `--backend auto` picks fscache."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from afsd.ondemand.cachefiles import FscacheClient, fscache_mounts
from tests.support.cluster import LocalCluster, small_image, unmount_everything_under
from tests.support.treecompare import compare_trees, format_differences, snapshot
from tests.support.umoci import umoci_rootfs


async def test_afsd_mount_with_the_fscache_backend_is_the_tree_umoci_unpacks(cluster: LocalCluster) -> None:
    await cluster.start_discovery(1)
    (layerstore,) = await cluster.start_layerstores(1)
    node = await cluster.start_node(layerstore)
    supervisor = FscacheClient(Path(node.args[node.args.index("--state-dir") + 1]) / "fscache")
    image = await cluster.push_features(3 << 20)
    other = await cluster.push("small", small_image("small", 2 << 20))
    target, auto_target = cluster.workdir / "rootfs", cluster.workdir / "auto"
    target.mkdir()
    auto_target.mkdir()
    try:
        mounted = await cluster.afsd(node, "mount", image.reference, str(target), "--backend", "fscache")
        assert mounted.returncode == 0, mounted.stderr
        assert "with backend fscache" in mounted.stdout
        layers = len(image.manifests[0].layers)
        assert layers >= 3 and len(fscache_mounts()) == layers   # each layer is an erofs mount in fscache mode

        reference = await asyncio.to_thread(umoci_rootfs, image, image.platforms[0], cluster.workdir / "umoci")
        differences = compare_trees(await asyncio.to_thread(snapshot, target),
                                    await asyncio.to_thread(snapshot, reference), labels=("afsd mount", "umoci"))
        assert differences == [], format_differences(differences, ("afsd mount", "umoci"))

        chosen = await cluster.afsd(node, "mount", other.reference, str(auto_target))   # --backend auto
        assert chosen.returncode == 0, chosen.stderr
        assert "with backend fscache" in chosen.stdout

        listed = json.loads((await cluster.afsd(node, "mounts", "--json")).stdout)
        assert sorted(m["backend"] for m in listed["mounts"]) == ["fscache", "fscache"]
        assert "fanotify" in listed["backends"] and listed["backends"]["fscache"] == "available"
        assert float(listed["counters"]["fscache.requests_open"]) >= layers + 2
        assert float(listed["counters"]["fscache.requests_read"]) > 0
        # The layers' bytes live in the cachefiles cache: `afsd mounts` counts them there.
        for mount in listed["mounts"]:
            assert 0 < int(mount["bytes_cached"]) <= int(mount["bytes_total"]), mount

        for mountpoint in (auto_target, target):
            unmounted = await cluster.afsd(node, "umount", str(mountpoint))
            assert unmounted.returncode == 0, unmounted.stderr
        assert fscache_mounts() == {}
    finally:
        # The supervisor outlives the node daemon by design; the next test needs /dev/cachefiles free.
        await asyncio.to_thread(unmount_everything_under, cluster.workdir)
        await supervisor.shutdown(force=True)
