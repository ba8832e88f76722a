"""One Execute call from its first frame to `done`, and the session directory it works in.

Order of events (frames sent to the client in brackets):

    start frame → validate → admission → [accepted] → [log execution] → session dir; image config resolved
    meanwhile → extra files until the client half-closes → mount (image + extra dir + writable upper)
    → user, env, bundle → runc run -d → [log ... as lines arrive] → exit, or the staged abort (timeout,
    `afsd stop`, shutdown) → [log stop ..., log resource] → [result] → [tar_header, tar_chunk...]
    → teardown → [done]

The call registers its execution (executions.py) right after admission: execution management lists it,
reads its log tail (every log frame sent is kept there too) and can stop it. The execution id is the
session id; it reaches the client in `accepted.execution_id` and in the `execution` log frame.

Teardown (container, cgroup, mount, session dir, then the admission share) runs on every path: a
setup error, an invalid frame after `accepted`, a client that goes away. It is shielded from
cancellation, so a cancelled call still finishes cleaning up; `done` is sent only after it, so a
client that saw `done` knows nothing of its call is left on the node.

Session directory `<work-dir>/sessions/<id>/`, mode 0700 (owned by the containers' root with
`--userns`, so that runc's init can reach the rootfs; nobody else can): `extra/` (uploaded files +
mount-point stubs, a read-only lower), `rootfs/` (the overlay mount point, rootfs.py), `image/` (with
`--userns`: the node daemon's read-only image), `rw/` (`rw/upper`, `rw/work` of the overlay), `bundle/`
(config.json, runc's log and pid file).

Bounds (request.RequestBounds): the start frame must come within `first_frame_timeout` and the upload
end within `upload_timeout` of `accepted` (DEADLINE_EXCEEDED, share released); extra files are capped in
bytes and entries, the writable layer in bytes (RESOURCE_EXHAUSTED naming the limit, after `result`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shlex
import shutil
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import grpc

from afsd import phases
from afsd.afslet import bundle as oci
from afsd.afslet import resources
from afsd.afslet.admission import Reservation
from afsd.afslet.cgroups import CgroupUsage
from afsd.afslet.container import Container
from afsd.afslet.errors import AdmissionError, DeadlineError, LimitError, RequestError, SetupError, ShuttingDownError
from afsd.afslet.executions import Execution, new_execution_id
from afsd.afslet.extra_files import ExtraTree, add_mount_stubs
from afsd.afslet.metrics import EXECUTIONS, PHASE_SECONDS, STOPS, TEARDOWN_FAILURES
from afsd.afslet.outcome import (
    EXIT_SETUP_FAILED,
    Outcome,
    command_outcome,
    exit_code_of,
    not_started_outcome,
    setup_outcome,
)
from afsd.afslet.process import ProcessPlan, plan_process, with_default
from afsd.afslet.request import ExecuteSpec, parse_start
from afsd.afslet.rootfs import SessionRootfs
from afsd.afslet.runtime import Runtime, container_id
from afsd.afslet.stopping import wants_interrupt, wire_stop
from afsd.afslet.upper_tar import stream_upper_tar, upper_size
from afsd.afslet.users import resolve_user
from afsd.api import afslet_pb2 as pb
from afsd.api import discovery_pb2 as dpb
from afsd.cluster.discovery_client import DiscoveryUnavailableError
from afsd.net.bridge import Attachment
from afsd.node.records import mounted_paths

log = logging.getLogger(__name__)

STDOUT_SOURCE = "runc:stdout"   # the reference's source names, kept for its users' log filters
STDERR_SOURCE = "runc:stderr"
TIMING_PREFIX = "__AFS_AFSLET_TIMING__"
TAR_NAME = "writable-upper.tar.gz"

Send = Callable[[pb.ExecuteResponse], Awaitable[None]]


def log_frame(source: str, message: str) -> pb.ExecuteResponse:
    return pb.ExecuteResponse(log=pb.LogMessage(source=source, message=message))


@dataclass(frozen=True)
class SessionPaths:
    root: Path

    @property
    def extra(self) -> Path:
        return self.root / "extra"

    @property
    def rootfs(self) -> Path:
        return self.root / "rootfs"

    @property
    def rw(self) -> Path:
        return self.root / "rw"

    @property
    def upper(self) -> Path:
        return self.root / "rw" / "upper"

    @property
    def bundle(self) -> Path:
        return self.root / "bundle"

    def create(self, owner: int = 0) -> None:
        """The session's directories; the session's own is 0700 and belongs to `owner` (a host uid)."""
        self.root.parent.mkdir(mode=0o711, parents=True, exist_ok=True)
        self.root.mkdir(mode=0o700)
        if owner:
            os.chown(self.root, owner, owner)
        for directory in (self.extra, self.rootfs, self.rw, self.bundle):
            directory.mkdir()


def shutting_down(runtime: Runtime) -> ShuttingDownError:
    where = f" on {runtime.config.node_id}" if runtime.config.node_id else ""
    return ShuttingDownError(f"afslet{where} is shutting down and admits no new executions; retry on another "
                             "afslet or once it is back")


def remove_session_dir(root: Path) -> bool:
    """rm -rf the session, unless something is still mounted inside (then it would reach into the mount)."""
    prefix = str(root) + "/"
    if any(point == str(root) or point.startswith(prefix) for point in mounted_paths()):
        return False
    shutil.rmtree(root, ignore_errors=True)
    return not root.exists()


class ExecuteCall:
    def __init__(self, runtime: Runtime, frames: AsyncIterator[pb.ExecuteRequest], send: Send) -> None:
        self.runtime = runtime
        self.frames = frames
        self._send = send
        self.session_id = new_execution_id()  # the execution's id too
        self.paths = SessionPaths(runtime.config.sessions_dir / self.session_id)
        self.execution: Execution | None = None
        self._stop_lines: list[str] = []
        self._reservation: Reservation | None = None
        self._container: Container | None = None
        self._mount_task: asyncio.Future[object] | None = None
        self._rootfs = SessionRootfs(runtime.mounts, self.paths.root, runtime.config.id_map, runtime.userns_fd)
        self._attachment: Attachment | None = None
        self._teardown_task: asyncio.Future[None] | None = None
        self._rootfs_release: asyncio.Future[None] | None = None
        self._teardown_steps = phases.PhaseLog()   # replaced when the release starts
        self._created = False
        self._outcome_label = "cancelled"
        self._started = time.monotonic()

    # -- frames ---------------------------------------------------------------------------------

    async def send_log(self, source: str, message: str) -> None:
        if self.execution is not None:
            self.execution.logs.append(source, message)
        await self._send(log_frame(source, message))

    def _note_stop(self, line: str) -> None:
        """Progress of a staged abort: into the log tail at once (`afsd logs -f` shows it live), and to the
        client as `stop` frames once the command has ended (the abort cannot wait for a slow client)."""
        if self.execution is not None:
            self.execution.logs.append("stop", line)
        self._stop_lines.append(line)

    async def _phase(self, name: str, started: float) -> float:
        seconds = time.monotonic() - started
        PHASE_SECONDS.labels(name).observe(seconds)
        await self.send_log("timing", f"{TIMING_PREFIX} phase={name} ms={seconds * 1000:.1f}")
        return seconds

    # -- the call -------------------------------------------------------------------------------

    async def run(self) -> None:
        if self.runtime.draining:
            EXECUTIONS.labels("draining").inc()
            raise shutting_down(self.runtime)
        try:
            start = await self._first_frame()
            spec = parse_start(start, self.runtime.config.timeouts)
        except RequestError:
            EXECUTIONS.labels("invalid").inc()
            raise
        if self.runtime.draining:
            EXECUTIONS.labels("draining").inc()
            raise shutting_down(self.runtime)
        try:
            self._reservation = self.runtime.admission.reserve(spec.cpu_cores, spec.memory_mb, spec.gpus)
        except AdmissionError:
            EXECUTIONS.labels("rejected").inc()
            raise
        self.execution = self.runtime.executions.register(
            self.session_id, image=str(spec.reference), command=spec.command, cpu_cores=spec.cpu_cores,
            memory_mb=spec.memory_mb, gpus=spec.gpus, timeout_ms=spec.timeout_ms)
        try:
            await self._admitted(spec)
        except RequestError as error:
            self._outcome_label = "invalid"
            self.execution.finish(Outcome(EXIT_SETUP_FAILED, f"invalid request: {error}", "invalid"), None)
            raise
        finally:
            EXECUTIONS.labels(self._outcome_label).inc()
            await self._teardown_once()

    async def _first_frame(self) -> pb.StartRequest:
        timeout = self.runtime.config.bounds.first_frame_timeout
        try:
            frame = await asyncio.wait_for(anext(aiter(self.frames)), timeout)
        except StopAsyncIteration:
            raise RequestError("missing start request: the stream ended before its first frame") from None
        except TimeoutError:
            raise DeadlineError(f"no start frame within {timeout:g} s (afsd let --first-frame-timeout)") from None
        kind = frame.WhichOneof("payload")
        if kind != "start":
            raise RequestError(f"first request must be start, got {kind or 'an empty frame'}")
        return frame.start

    async def _admitted(self, spec: ExecuteSpec) -> None:
        config = self.runtime.config
        await self._send(pb.ExecuteResponse(accepted=pb.Accepted(accepted=True, execution_id=self.session_id)))
        await self.send_log("execution", json.dumps({"id": self.session_id, "node_id": config.node_id,
                                                     "endpoint": config.endpoint}))
        await self._phase("admission", self._started)
        owner = config.id_map.host_start if config.id_map is not None else 0
        await asyncio.to_thread(self.paths.create, owner)
        self._created = True
        await self.send_log("session", f"session {self.session_id}, container {container_id(self.session_id)}, "
                                       f"directory {self.paths.root}")
        outcome = await self._prepare_and_run(spec)
        assert self.execution is not None
        self.execution.finish(outcome, self._container.final_usage if self._container else None)
        stop_stage, stop_reason = wire_stop(outcome.stop)
        await self._send(pb.ExecuteResponse(result=pb.Result(
            success=outcome.success, exit_code=outcome.exit_code, error=outcome.error, execution_id=self.session_id,
            stop_stage=stop_stage, stop_reason=stop_reason)))
        self._outcome_label = outcome.kind
        started = time.monotonic()
        limit = config.bounds.max_upper_bytes
        if (size := await asyncio.to_thread(upper_size, self.paths.upper)) > limit:
            raise LimitError(f"the writable layer holds {size} bytes, over this afslet's limit of {limit} bytes "
                             "(afsd let --max-upper-bytes); it is not returned")
        await self._send(pb.ExecuteResponse(tar_header=pb.TarHeader(name=TAR_NAME)))
        async for chunk in stream_upper_tar(self.paths.upper, config.tar_chunk, config.id_map):
            await self._send(pb.ExecuteResponse(tar_chunk=pb.TarChunk(data=chunk)))
        await self._phase("upload", started)
        started = time.monotonic()
        await self._teardown_once()
        await self._phase("teardown", started)
        await self._phase("total", self._started)
        await self._send(pb.ExecuteResponse(done=pb.Done()))

    async def _prepare_and_run(self, spec: ExecuteSpec) -> Outcome:
        resolving = asyncio.ensure_future(self._resolve_image(spec))
        try:
            started = time.monotonic()
            bounds = self.runtime.config.bounds
            tree = ExtraTree(str(self.paths.extra), max_bytes=bounds.max_extra_bytes,
                             max_entries=bounds.max_extra_entries)
            try:
                await asyncio.wait_for(self._receive_files(tree), bounds.upload_timeout)
            except TimeoutError:
                raise DeadlineError(f"the upload of extra files did not end within {bounds.upload_timeout:g} s "
                                    "(afsd let --upload-timeout)") from None
            finally:
                tree.close()
            await self._phase("receive", started)
            try:
                resolved = await resolving
                plan = plan_process(spec, resolved.runtime_config)
                return await self._mount_and_run(spec, resolved, plan, tree)
            except SetupError as error:
                await self.send_log("afslet", f"setup failed: {error}")
                return setup_outcome(error.status, str(error))
            except OSError as error:
                log.exception("session %s: setup failed", self.session_id)
                return setup_outcome(EXIT_SETUP_FAILED, f"setup failed on the node: {error}")
        finally:
            # An upload that failed leaves the resolution unneeded: stop it, and take its outcome so that
            # asyncio does not report an exception nobody retrieved.
            resolving.cancel()
            await asyncio.wait([resolving])
            if not resolving.cancelled():
                resolving.exception()

    async def _receive_files(self, tree: ExtraTree) -> None:
        async for frame in self.frames:
            kind = frame.WhichOneof("payload")
            if kind == "file_begin":
                await tree.begin(frame.file_begin)
            elif kind == "file_chunk":
                await tree.chunk(frame.file_chunk)
            elif kind == "file_end":
                await tree.end()
            elif kind == "start":
                raise RequestError("duplicate start: only the first frame may be start")
            else:
                raise RequestError("empty request frame (no payload set)")
        await tree.complete()

    async def _resolve_image(self, spec: ExecuteSpec) -> dpb.ResolveImageResponse:
        started = time.monotonic()
        request = dpb.ResolveImageRequest(image=str(spec.reference), platform_os=spec.platform.os,
                                          platform_arch=spec.platform.architecture,
                                          platform_variant=spec.platform.variant)
        try:
            resolved = await self.runtime.discovery.resolve_image(request)
        except grpc.aio.AioRpcError as error:
            raise SetupError(f"cannot resolve image {spec.reference} ({spec.platform}): "
                             f"{error.details() or error.code().name}") from None
        except DiscoveryUnavailableError as error:
            raise SetupError(f"cannot resolve image {spec.reference}: {error}") from None
        await self._phase("resolve", started)
        config = resolved.runtime_config
        await self.send_log("image", f"{spec.reference} ({spec.platform}) is {resolved.manifest_digest}: "
                                     f"entrypoint={list(config.entrypoint)} cmd={list(config.cmd)} "
                                     f"env={len(config.env)} entries working_dir={config.working_dir or '/'} "
                                     f"user={config.user or 'root'}")
        return resolved

    async def _mount_and_run(self, spec: ExecuteSpec, resolved: dpb.ResolveImageResponse, plan: ProcessPlan,
                             tree: ExtraTree) -> Outcome:
        config = self.runtime.config
        resolv = self.runtime.network.resolv_conf  # the host's, or (bridge) its version for the bridge
        host_resolv = resolv if resolv and "etc/resolv.conf" not in tree.paths else None
        await asyncio.to_thread(add_mount_stubs, str(self.paths.extra), resolv_conf=host_resolv is not None,
                                directories=[bind.destination for bind in config.binds])
        if host_resolv is not None and not await asyncio.to_thread(host_resolv.is_file):
            host_resolv = None

        # Pin the mount to the manifest the runtime config came from: a tag that moves in between cannot
        # give us one image's layers with another's entrypoint.
        image = str(spec.reference.with_digest(resolved.manifest_digest)) if resolved.manifest_digest \
            else str(spec.reference)
        started = time.monotonic()
        self._mount_task = asyncio.ensure_future(self._rootfs.mount(image, str(spec.platform), self.paths.extra))
        info = await asyncio.shield(self._mount_task)
        await self._phase("mount", started)
        await self.send_log("mount", f"{info.image} at {info.target}: {len(info.layers)} layers, backend "
                                     f"{info.backend}, {info.bytes_cached} of {info.bytes_total} bytes on this node")

        user = await asyncio.to_thread(resolve_user, self.paths.rootfs, plan.user)
        env = with_default(list(plan.env), "HOME", user.home)
        limits = oci.ContainerLimits(spec.cpu_cores, spec.memory_mb, config.pids_limit)
        cgroup_path = self.runtime.cgroup_path(self.session_id)
        document = oci.oci_config(rootfs=self.paths.rootfs, args=list(plan.args), env=env, cwd=plan.cwd, user=user,
                                  cgroups_path=cgroup_path, limits=limits, isolation=config.isolation,
                                  resolv_conf=host_resolv, binds=config.binds)
        await asyncio.to_thread(oci.write_bundle, self.paths.bundle, document)
        interrupt = wants_interrupt(env)
        timeout_note = " (server default)" if spec.timeout_is_default else ""
        policy = config.stop_policy
        await self.send_log("request", f"args={shlex.join(plan.args)} cwd={plan.cwd} user={user.uid}:{user.gid}"
                                       f"{' (' + user.name + ')' if user.name else ''} cpu_cores={spec.cpu_cores} "
                                       f"memory_mb={spec.memory_mb} gpus={spec.gpus} pids={config.pids_limit} "
                                       f"timeout_ms={spec.timeout_ms}{timeout_note} network={config.network.mode} "
                                       f"stop=SIGTERM:{policy.term_timeout:g}s"
                                       f"{f',SIGINT:{policy.interrupt_timeout:g}s' if interrupt else ''}"
                                       f",SIGKILL:{policy.kill_timeout:g}s")
        assert self.execution is not None
        self.execution.command = plan.args
        return await self._run_container(spec, cgroup_path, interrupt)

    async def _run_container(self, spec: ExecuteSpec, cgroup_path: str, interrupt: bool) -> Outcome:
        assert self.execution is not None
        if self.execution.stop_reason is not None:  # stopped while it was being prepared
            outcome = not_started_outcome(self.execution.stop_reason)
            await self.send_log("runc", outcome.error)
            return outcome
        self._container = container = Container(
            self.runtime.runc, container_id(self.session_id), self.paths.bundle, cgroup_path,
            stop_policy=self.runtime.config.stop_policy, interrupt_on_stop=interrupt, note=self._note_stop)
        self.execution.container_started(container)

        async def stdout(line: str) -> None:
            await self.send_log(STDOUT_SOURCE, line)

        async def stderr(line: str) -> None:
            await self.send_log(STDERR_SOURCE, line)

        async def attach_network(init_pid: int) -> None:
            self._attachment = attachment = await self.runtime.network.attach(init_pid)
            if attachment is not None:
                await self.send_log("network", self.runtime.network.describe(attachment))

        before_start = attach_network if self.runtime.network.bridge is not None else None
        with self.runtime.container_running():
            exit_ = await container.run(spec.timeout_ms / 1000, stdout, stderr, before_start)
        self.execution.run_ended = time.monotonic()
        self._release_rootfs()
        run_seconds = exit_.run_seconds
        for phase, seconds in (("start", exit_.start_seconds), ("run", run_seconds)):
            PHASE_SECONDS.labels(phase).observe(seconds)
            await self.send_log("timing", f"{TIMING_PREFIX} phase={phase} ms={seconds * 1000:.1f}")
        for line in self._stop_lines:  # already in the log tail
            await self._send(log_frame("stop", line))
        code = exit_code_of(exit_.wait_status) if exit_.wait_status >= 0 else 255
        usage = exit_.usage
        await self.send_log("resource", resources.summary_json(self.session_id, usage, run_seconds))
        outcome = command_outcome(code, stop=exit_.stop, timeout_ms=spec.timeout_ms, oom_kills=usage.oom_kills,
                                  memory_mb=spec.memory_mb)
        self._account(outcome, usage)
        await self.send_log("runc", outcome.error or "command exited with code 0")
        return outcome

    @staticmethod
    def _account(outcome: Outcome, usage: CgroupUsage) -> None:
        """Metrics of a command that ran: its resource use, and the stage that ended it if afslet stopped it."""
        resources.observe(outcome.kind, usage)
        if outcome.stop is not None:
            STOPS.labels(outcome.stop.reason.value, outcome.stop.stage.value).inc()

    # -- teardown -------------------------------------------------------------------------------

    async def _teardown_once(self) -> None:
        if self._teardown_task is None:
            self._teardown_task = asyncio.ensure_future(self._teardown())
            self.runtime.track(self._teardown_task)
        await asyncio.shield(self._teardown_task)

    def _release_rootfs(self) -> asyncio.Future[None]:
        """Remove the container, then unmount the rootfs it ran in (started once, awaited by teardown).

        Started as soon as the command has exited, so that it overlaps sending the result and the tar
        (which reads the upper directory, not the mount).
        """
        if self._rootfs_release is None:
            with phases.recording() as self._teardown_steps:   # the task copies the context: its steps go there
                self._rootfs_release = asyncio.ensure_future(self._remove_container_and_mount())
            self.runtime.track(self._rootfs_release)
        return self._rootfs_release

    async def _remove_container_and_mount(self) -> None:
        try:
            if self._container is not None:
                with phases.phase("container"):
                    leftovers = await self._container.destroy()
                if leftovers:
                    TEARDOWN_FAILURES.labels("cgroup").inc()
                    log.error("session %s: cgroup directories remain: %s", self.session_id, ", ".join(leftovers))
            attachment, self._attachment = self._attachment, None
            with phases.phase("network"):
                await self.runtime.network.detach(attachment)
            if self._mount_task is not None:
                await asyncio.wait([self._mount_task])
                with phases.phase("rootfs"):
                    unmounted = await self._rootfs.unmount()
                if not unmounted:
                    TEARDOWN_FAILURES.labels("mount").inc()
        except Exception:
            log.exception("session %s: removing the container or its mount failed", self.session_id)
            TEARDOWN_FAILURES.labels("error").inc()

    async def _teardown(self) -> None:
        try:
            await self._release_rootfs()
            started = time.monotonic()
            if self._created and not await asyncio.to_thread(remove_session_dir, self.paths.root):
                TEARDOWN_FAILURES.labels("session_dir").inc()
                log.error("session %s: %s kept: something is still mounted inside", self.session_id, self.paths.root)
            self._teardown_steps.add("session_dir", time.monotonic() - started)
        except Exception:
            log.exception("session %s: teardown failed", self.session_id)
            TEARDOWN_FAILURES.labels("error").inc()
        finally:
            if self.execution is not None:
                self.runtime.executions.retire(self.execution, await self._unfinished_outcome())
            if self._reservation is not None:
                self._reservation.release()
        # From the command's exit (or the call's end), overlapping the result and the tar.
        log.info("session %s: teardown, ms by step: %s", self.session_id, self._teardown_steps.summary())

    async def _unfinished_outcome(self) -> Outcome:
        """How a call that ended before its result (client gone, afslet stopped, invalid frame) ended, for
        execution management; the staged abort its container got is counted here."""
        container = self._container
        if self.execution is None or self.execution.outcome is not None:
            return Outcome(EXIT_SETUP_FAILED, "", self._outcome_label)
        if container is None or not container.started:
            return Outcome(EXIT_SETUP_FAILED, "the call ended before the command started", self._outcome_label)
        try:
            stop = await container.stopped()
        except TimeoutError:
            stop = None
        status = container.exit_status
        code = exit_code_of(status) if status is not None and status >= 0 else 255
        outcome = command_outcome(code, stop=stop, timeout_ms=self.execution.timeout_ms)
        if outcome.kind == "ok":  # it had ended on its own just before the call did
            outcome = Outcome(code, "the call ended before its result was sent", self._outcome_label)
        self._account(outcome, container.final_usage or CgroupUsage())
        return outcome
