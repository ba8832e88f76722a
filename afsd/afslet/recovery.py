"""At startup: remove what an earlier afslet with the same work dir left behind when it died.

Its containers are in afslet's own runc root (every one of them is afslet's: kill and delete them),
its sessions in `<work-dir>/sessions/<id>` (unmount each rootfs: afslet's own idmapped overlay, and
the node daemon's mount; remove the container's cgroup, remove the directory). Its bridge, veths and nft
table are replaced by the network's start (network.py), which comes right after. Nothing belonging to
another afslet is touched: cgroups are named after this work dir's sessions only.
"""

from __future__ import annotations

import asyncio
import logging

from afsd.afslet import cgroups
from afsd.afslet.rootfs import SessionRootfs
from afsd.afslet.runtime import Runtime, container_id
from afsd.afslet.session import remove_session_dir

log = logging.getLogger(__name__)


async def recover(runtime: Runtime) -> int:
    """Clean up leftovers; return how many containers and sessions were removed."""
    removed = 0
    for cid in await runtime.runc.list_ids():
        log.warning("removing container %s left by an earlier afslet", cid)
        await runtime.runc.kill(cid)
        await runtime.runc.delete(cid)
        await asyncio.to_thread(cgroups.remove, f"/{runtime.config.cgroup_parent.strip('/')}/{cid}")
        removed += 1
    sessions = runtime.config.sessions_dir
    if not await asyncio.to_thread(sessions.is_dir):
        return removed
    for root in sorted(await asyncio.to_thread(lambda: list(sessions.iterdir()))):
        log.warning("removing session %s left by an earlier afslet", root.name)
        await asyncio.to_thread(cgroups.remove, runtime.cgroup_path(root.name))
        rootfs = await asyncio.to_thread(SessionRootfs.leftover, runtime.mounts, root)
        await rootfs.unmount()
        if not await asyncio.to_thread(remove_session_dir, root):
            log.error("cannot remove %s: something is still mounted inside", root)
        removed += 1
    log.debug("container id scheme: %s", container_id("<session>"))
    return removed
