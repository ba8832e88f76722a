"""`AfsProxy.Status`: a server stream describing the cluster behind the proxy.

Frames, in order: StatusError frames for what could not be asked (source `discovery` or `afslet_resolve`),
one `layerstore` frame per layerstore known to any discovery replica, one `afslet` frame per address the
afslet target resolves to (with its runtime status, or `reachable=false` and why), then one `summary`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from afsd.api import afsproxy_pb2 as pb
from afsd.api import discovery_pb2 as dpb
from afsd.proxy.backends import BackendChannels, BackendStatus, probe_all
from afsd.proxy.config import ProxyConfig
from afsd.proxy.discovery_view import discovery_view
from afsd.proxy.errors import TargetResolveError
from afsd.proxy.targets import resolve_target
from afsd.rpc import ChannelPool


def _error(source: str, message: str) -> pb.StatusResponse:
    return pb.StatusResponse(error=pb.StatusError(source=source, message=message))


def _layerstore(instance: dpb.ServiceInstance) -> pb.LayerstoreInstance:
    stats = {stat.digest: stat.afs_size for stat in instance.layer_stats}
    for digest in instance.layer_digests:
        stats.setdefault(digest, 0)
    return pb.LayerstoreInstance(
        node_id=instance.node_id, endpoint=instance.endpoint, last_seen_unix=instance.last_seen_unix,
        cache_max_bytes=instance.cache_max_bytes,
        layers=[pb.LayerInfo(digest=digest, afs_size=size) for digest, size in sorted(stats.items())],
        cached_images=sorted(instance.cached_images))


def _afslet(backend: BackendStatus) -> pb.AfsletInstance:
    if backend.status is None:
        return pb.AfsletInstance(endpoint=backend.address, reachable=False, error=backend.error)
    s = backend.status
    return pb.AfsletInstance(
        endpoint=backend.address, reachable=True, error="draining: takes no new calls" if s.draining else "",
        running_containers=s.running_containers,
        limit_cpu_cores=s.limit_cpu_cores, limit_memory_mb=s.limit_memory_mb, used_cpu_cores=s.used_cpu_cores,
        used_memory_mb=s.used_memory_mb, available_cpu_cores=s.available_cpu_cores,
        available_memory_mb=s.available_memory_mb)


async def status_stream(request: pb.StatusRequest, config: ProxyConfig, channels: ChannelPool,
                        backends: BackendChannels) -> AsyncIterator[pb.StatusResponse]:
    summary = pb.StatusSummary()
    if request.include_layerstores:
        if not config.discovery_target:
            yield _error("discovery", "this proxy has no --discovery-target: it cannot list layerstores")
        else:
            try:
                view = await discovery_view(config.discovery_target, channels, config.status_timeout)
            except TargetResolveError as error:
                yield _error("discovery", str(error))
            else:
                for problem in view.errors:
                    yield _error("discovery", problem)
                for instance in view.instances:
                    frame = _layerstore(instance)
                    summary.layerstore_instances += 1
                    summary.total_layers += len(frame.layers)
                    yield pb.StatusResponse(layerstore=frame)
    if request.include_afslets:
        try:
            addresses = await resolve_target(config.afslet_target)
        except TargetResolveError as error:
            yield _error("afslet_resolve", str(error))
        else:
            for backend in await probe_all(backends, addresses, config.status_timeout):
                summary.afslet_instances += 1
                summary.afslet_reachable += backend.reachable
                yield pb.StatusResponse(afslet=_afslet(backend))
    yield pb.StatusResponse(summary=summary)
