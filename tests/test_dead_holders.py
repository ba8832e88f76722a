"""A holder that died is still listed by discovery until its heartbeat expires (the TTL, 30 s by
default). A mount in that time must not fail on it: the node has a layerstore pull the image instead,
and whoever asked the node hears what the node said, not that the node is down."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from afsd.afslet.errors import SetupError
from afsd.afslet.node_mounts import NodeMounts
from afsd.lab.catalogue import seeded_bytes
from tests.support.cluster import LocalCluster, one_line, small_image


async def test_a_mount_whose_only_listed_holder_died_pulls_the_image_instead(cluster: LocalCluster) -> None:
    (discovery,) = await cluster.start_discovery(1, ttl=600.0)   # the dead holder stays listed throughout
    # The node's own layerstore starts once the holder is dead: started earlier, it could be the one a
    # layerstore asked to pull hands the registry download to (and so hold the layer too).
    (first,) = await cluster.start_layerstores(1)
    image = await cluster.push("orphaned", small_image("orphaned", 2 << 20, layers=1))
    (layer,) = (await cluster.pull(first, image)).layers
    async def listed_holders() -> bool:
        return await cluster.nodes_for_layer(discovery, layer.digest) == {first.name}
    await cluster.wait_until(listed_holders, 20, "discovery to list the first layerstore as the holder")
    await asyncio.to_thread(first.kill)

    (second,) = await cluster.start_layerstores(1)
    node = await cluster.start_node(second)
    target = cluster.workdir / "rootfs"
    target.mkdir()
    mounted = await cluster.afsd(node, "mount", image.reference, str(target))
    assert mounted.returncode == 0, mounted.stderr
    read = await asyncio.to_thread((target / "data/orphaned-0.bin").read_bytes)
    assert read == seeded_bytes("orphaned0", 2 << 20)
    async def pulled_again() -> bool:   # by the node's own layerstore, from the registry
        return second.name in await cluster.nodes_for_layer(discovery, layer.digest)
    await cluster.wait_until(pulled_again, 20, "discovery to list the node's layerstore as a holder too")
    assert (await cluster.afsd(node, "umount", str(target))).returncode == 0


async def test_the_afslet_tells_a_node_that_refused_from_a_node_that_is_not_there(cluster: LocalCluster,
                                                                                   tmp_path: Path) -> None:
    await cluster.start_discovery(1)
    node = await cluster.start_node(None)          # no layerstore anywhere: nobody can pull the image
    image = await cluster.push("nowhere", small_image("nowhere", 1 << 20))
    target, extra = tmp_path / "rootfs", tmp_path / "extra"
    target.mkdir()
    extra.mkdir()

    for socket, expected, unexpected in ((node.socket_path, "no layerstore", "does not answer"),
                                         (tmp_path / "absent.sock", "does not answer", "no layerstore")):
        assert socket is not None
        mounts = NodeMounts(socket)
        try:
            with pytest.raises(SetupError) as refused:
                await mounts.mount(image.reference, "linux/amd64", target, None, extra)
        finally:
            await mounts.close()
        message = str(refused.value)
        assert expected in message and unexpected not in message, message
    assert "no layerstore" in one_line(await cluster.afsd(node, "mount", image.reference, str(target)))
