"""afslet's life as a daemon, in order: start, serve, drain, stop. `afsd let` (afsd/cli/let.py) parses the
flags and calls `serve`.

    start   work dirs; become the subreaper; with --userns, the user namespace for idmapped mounts (and a
            check that this kernel makes them); remove what a crashed predecessor left (recovery.py);
            the containers' network (network.py: the bridge, replacing a predecessor's); gRPC server
            with afsletpb.Afslet (service.py) and afsd.executions.v1.Executions (management.py)
    serve   until SIGTERM or SIGINT
    drain   new Execute calls are refused with UNAVAILABLE (GetRuntimeStatus says `draining`); every
            execution in progress gets the staged abort (stopping.py), or never starts its command if it
            has not yet; the calls deliver their results and tars and tear down. Bounded by the stop
            policy's stages plus --graceful-timeout.
    stop    cancel the calls still going (their teardown still runs, shielded), stop the server, close
            the clients, remove the bridge and its rules, remove the empty cgroup parent; exit 0.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from afsd.afslet import cgroups
from afsd.afslet.admission import Admission
from afsd.afslet.executions import ExecutionTable
from afsd.afslet.management import ExecutionsService
from afsd.afslet.network import ContainerNetwork
from afsd.afslet.node_mounts import NodeMounts
from afsd.afslet.reaper import Subreaper
from afsd.afslet.recovery import recover
from afsd.afslet.runc import Runc
from afsd.afslet.runtime import AfsletConfig, Runtime
from afsd.afslet.userns import prepare_userns
from afsd.afslet.service import AfsletService
from afsd.api import afslet_pb2_grpc, executions_pb2_grpc
from afsd.cluster.discovery_client import DiscoveryClient
from afsd.errors import UsageError
from afsd.health import HEALTH
from afsd.rpc import ChannelPool, add_port, new_server
from afsd.trust.tls import security_line

if TYPE_CHECKING:
    from afsd.trust.tls import TlsConfig

log = logging.getLogger("afsd.let")

TEARDOWN_WAIT = 60.0  # for the teardown of calls cancelled at the very end


@dataclass(frozen=True)
class DaemonOptions:
    listen: str
    node_socket: Path
    discovery: list[str]
    mount_backend: str = "auto"
    metrics_listen: str | None = None
    graceful_timeout: float = 10.0  # after the staged aborts, for results, tars and teardown
    max_concurrent_rpcs: int = 256
    tls: TlsConfig | None = None    # mutual TLS for the Execute port and discovery; None: dev mode
    ready_file: Path | None = None  # written once serving: afsd/readiness.py


async def serve(config: AfsletConfig, options: DaemonOptions, executions: ExecutionTable | None = None) -> int:
    from afsd.metrics import serve_metrics
    from afsd.readiness import announce_ready, with_port

    await asyncio.to_thread(config.sessions_dir.mkdir, parents=True, exist_ok=True)
    await asyncio.to_thread(config.runc_state.mkdir, parents=True, exist_ok=True)
    metrics = serve_metrics(options.metrics_listen) if options.metrics_listen else None
    server = new_server(options.tls, maximum_concurrent_rpcs=options.max_concurrent_rpcs)
    listening = with_port(options.listen, add_port(server, options.listen, options.tls))
    if config.endpoint.endswith(":0"):  # advertised as listened on: with the port the kernel picked
        config = dataclasses.replace(config, endpoint=with_port(config.endpoint, int(listening.rpartition(":")[2])))

    userns_fd = -1
    if config.id_map is not None:
        userns_fd, line = await asyncio.to_thread(prepare_userns, config.id_map, config.work_dir)
        log.warning("%s", line)
    reaper = Subreaper()
    reaper.install()
    channels = ChannelPool(options.tls)
    mounts = NodeMounts(options.node_socket, options.mount_backend)
    network = ContainerNetwork(config.network, config.work_dir, config.resolv_conf)
    runtime = Runtime(config=config,
                      admission=Admission(config.limit_cpu_cores, config.limit_memory_mb, config.limit_gpus),
                      reaper=reaper, runc=Runc(config.runc_binary, config.runc_state, reaper), mounts=mounts,
                      discovery=DiscoveryClient(options.discovery, channels), network=network,
                      executions=executions or ExecutionTable(), userns_fd=userns_fd)
    removed = await recover(runtime)
    if removed:
        log.warning("removed %d containers/sessions left by an earlier run", removed)
    try:
        try:
            log.warning("%s", await network.start())
        except (OSError, RuntimeError) as error:
            raise UsageError(f"cannot set up the containers' network ({config.network.mode}): {error}; "
                             "--network none runs containers without one") from None
        afslet_pb2_grpc.add_AfsletServicer_to_server(AfsletService(runtime), server)
        executions_pb2_grpc.add_ExecutionsServicer_to_server(ExecutionsService(runtime), server)
        await server.start()
    except BaseException:
        await network.stop()
        raise
    log.warning("%s", security_line(f"afslet {config.node_id}", options.tls, listening))
    log.warning("afslet %s listening on %s (advertised %s): limits cpu=%d memory_mb=%d gpus=%d, network %s, "
                "user namespace %s, work dir %s, node socket %s", config.node_id, listening, config.endpoint,
                config.limit_cpu_cores, config.limit_memory_mb, config.limit_gpus, config.network.mode,
                "on" if config.id_map else "off", config.work_dir, options.node_socket)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    HEALTH.serving()
    try:
        await announce_ready(options.ready_file, listen=listening, metrics=metrics)
        await stop.wait()
    finally:
        HEALTH.draining()
        policy = config.stop_policy
        stopping = runtime.begin_drain()
        log.warning("afslet draining: admitting nothing new, stopping %d execution(s) (SIGTERM %gs, SIGINT %gs "
                    "where asked for, SIGKILL %gs)", stopping, policy.term_timeout, policy.interrupt_timeout,
                    policy.kill_timeout)
        await runtime.drain(timeout=policy.longest + options.graceful_timeout)
        await server.stop(1.0)  # cancels what is still going; its teardown is shielded and tracked
        await runtime.drain(timeout=TEARDOWN_WAIT)
        await reaper.close()
        await mounts.close()
        await channels.close()
        await network.stop()
        if userns_fd >= 0:
            os.close(userns_fd)
        await asyncio.to_thread(cgroups.remove_if_empty, config.cgroup_parent)
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
        HEALTH.stopped()
    return 0
