"""Handing complete blobs to the local layerstore: how a node that ran a task becomes a provider.

Where it sits: the node daemon (daemon.py) attaches layers; once a layer's blob is complete on this node
(its backend filled every byte), `HandOver` imports it into the node's own layerstore (`ImportLayer` on
the layerstore's admin socket), which then advertises this node as a provider of the layer. It checks
once when a layer is attached or adopted, and otherwise learns it from what the backends push
(`Backend.completed_blobs`); nothing is polled. A refused or failed import is offered again later.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
from prometheus_client import Counter

from afsd.api import layerstore_pb2 as lpb
from afsd.api import layerstore_pb2_grpc as lgrpc
from afsd.cluster.peers import stat_from_blob_spec
from afsd.errors import AfsdError
from afsd.ondemand.base import Backend

if TYPE_CHECKING:
    from afsd.node.daemon import LayerUse

log = logging.getLogger(__name__)

LAYERS_IMPORTED = Counter("afsd_node_layers_imported_total", "Complete blobs handed to the local layerstore")

IMPORT_RETRY = 30.0           # seconds before a layer the local layerstore refused is offered again
WATCH_RETRY = (0.5, 10.0)     # first and longest wait before watching a backend's pushes again


class HandOver:
    """Imports the complete blobs of `layers` (the daemon's attached layers, by layer digest) into the
    layerstore at `admin_socket`; `in_background` runs (and keeps) the daemon's background tasks."""

    def __init__(self, admin_socket: Path, layers: dict[str, LayerUse],
                 in_background: Callable[[Coroutine[Any, Any, None]], asyncio.Task[None]]) -> None:
        self.admin_socket = admin_socket
        self._layers = layers
        self._in_background = in_background

    async def watch(self, backend: Backend) -> None:
        """Hand a layer to the local layerstore as soon as its backend says its blob is complete. When the
        push stream breaks (its supervisor restarted), watch again and check once what was missed."""
        wait, failures = WATCH_RETRY[0], 0
        while True:
            try:
                async for name in backend.completed_blobs():
                    wait, failures = WATCH_RETRY[0], 0
                    use = next((u for u in self._layers.values() if u.spec.name == name and u.backend is backend), None)
                    if use is not None and not use.imported:
                        self._in_background(self._hand_over(use))
            except (AfsdError, OSError) as error:
                failures += 1
                (log.warning if failures == 1 else log.debug)(
                    "no completion events from the %s backend (%s): watching again", backend.name, error)
            await asyncio.sleep(wait)
            wait = min(WATCH_RETRY[1], wait * 2)
            for use in [u for u in self._layers.values() if u.backend is backend and not u.imported]:
                await self.if_complete(use)

    async def if_complete(self, use: LayerUse, *, retry: bool = True) -> None:
        """Hand `use` over if its blob is complete (`retry`: ask again later when the backend cannot tell)."""
        try:
            complete = await use.backend.is_complete(use.spec, use.blob_path)
        except (AfsdError, OSError) as error:
            log.warning("cannot tell whether %s is complete (%s): asking again later", use.spec.layer_digest, error)
            complete = False
            if retry:
                self._in_background(self._offer_again(use))
        if complete:
            await self._hand_over(use, retry=retry)

    async def _hand_over(self, use: LayerUse, *, retry: bool = True) -> None:
        """Import a complete blob into the local layerstore (once); a failure is offered again later."""
        if use.imported or use.importing:
            return
        use.importing = True
        try:
            await self._import(use)
        except (AfsdError, OSError, grpc.aio.AioRpcError) as error:
            log.warning("could not hand %s to the local layerstore (will retry): %s", use.spec.layer_digest, error)
            if retry:
                self._in_background(self._offer_again(use))
        finally:
            use.importing = False

    async def _offer_again(self, use: LayerUse) -> None:
        await asyncio.sleep(IMPORT_RETRY)
        if self._layers.get(use.spec.layer_digest) is use and not use.imported:
            await self.if_complete(use)

    async def _import(self, use: LayerUse) -> None:
        spec = use.spec
        stat = stat_from_blob_spec(spec)
        async with grpc.aio.insecure_channel(f"unix:{self.admin_socket}") as channel:
            response = await lgrpc.LocalLayerStoreStub(channel).ImportLayer(
                lpb.ImportLayerRequest(path=str(use.blob_path), stat=stat), timeout=600)
        use.imported = True
        if response.imported:
            LAYERS_IMPORTED.inc()
            log.info("this node now provides %s (blob assembled by its mounts)", spec.layer_digest)
