"""`afsd let` enforces what it admits: a memory limit the OOM killer holds, a CPU quota, and admission
of whole cores and megabytes against `--limit-cpu 2 --limit-memory-mb 1024`, visible in
GetRuntimeStatus while calls run and after they end. Driven with the published afs-sdk client."""

from __future__ import annotations

import json

import pytest

from afsd.afslet import cgroups
from tests.support.afslet import (
    AfsletCluster,
    module_cluster,
    sdk_execute,
    sdk_execute_call,
    sdk_status,
)

pytestmark = pytest.mark.usefixtures("nothing_left_behind")

# Two busy loops for three seconds, then the CPU time they got (clock ticks, USER_HZ = 100) and the wall time.
CPU_PROBE = """
yes >/dev/null & a=$!
yes >/dev/null & b=$!
read up0 _ < /proc/uptime
sleep 3
read up1 _ < /proc/uptime
ticks=0
for p in $a $b; do read -r line < /proc/$p/stat; set -- $line; ticks=$((ticks + ${14} + ${15})); done
kill $a $b
echo "$ticks $up0 $up1"
"""


# The long-running commands here have no SIGTERM handler: a short first stage keeps their stop quick.
afslet_cluster = module_cluster("afslet-limits", limit_cpu=2, limit_memory_mb=1024,
                                afslet_args=["--stop-term-timeout", "1"])


def test_a_command_allocating_past_its_memory_limit_is_oom_killed(afslet_cluster: AfsletCluster) -> None:
    tools = afslet_cluster.images["tools"]
    # dd allocates its block size up front: 8 MiB fits in 32 MB, 64 MiB does not.
    fits = sdk_execute(afslet_cluster.afslet, image=tools, memory_mb=32, timeout_ms=30_000,
                       command=["dd", "if=/dev/zero", "of=/dev/null", "bs=8M", "count=2"])
    assert fits.result["exit_code"] == 0, fits.result

    hog = sdk_execute(afslet_cluster.afslet, image=tools, memory_mb=32, timeout_ms=30_000,
                      command=["dd", "if=/dev/zero", "of=/dev/null", "bs=64M", "count=1"])
    assert (hog.result["success"], hog.result["exit_code"]) == (False, 137)  # SIGKILL, from the OOM killer
    assert "out of memory" in hog.result["error"] and "32 MB" in hog.result["error"]
    (resource,) = hog.lines("resource")           # the cgroup's own count, in the final resource summary
    assert json.loads(resource)["oom_kills"] >= 1, resource


def quota_cores(cgroup_path: str) -> float | None:
    """The CPU quota the kernel enforces on a cgroup, in cores (cgroup2's cpu.max, or v1's CFS files)."""
    for directory in cgroups.directories(cgroup_path):
        if (directory / "cpu.max").exists():
            quota, period = (directory / "cpu.max").read_text().split()
            return None if quota == "max" else int(quota) / int(period)
        if (directory / "cpu.cfs_quota_us").exists():
            quota = int((directory / "cpu.cfs_quota_us").read_text())
            return None if quota < 0 else quota / int((directory / "cpu.cfs_period_us").read_text())
    raise AssertionError(f"no CPU controller for {cgroup_path}")


def test_the_cpu_quota_holds(afslet_cluster: AfsletCluster) -> None:
    afslet = afslet_cluster.afslet
    running = sdk_execute_call(afslet, image=afslet_cluster.images["tools"], cpu_cores=1, timeout_ms=60_000,
                               command=["/bin/sh", "-c", "echo probing\n" + CPU_PROBE])
    running.wait_for(lambda e: e.get("message") == "probing")
    # What the kernel holds the container to, however busy the host is.
    (container,) = cgroups.children(afslet.args[afslet.args.index("--cgroup-parent") + 1])
    assert quota_cores(container) == 1.0
    call = running.finish()
    assert call.result["exit_code"] == 0, call.result
    ticks, up0, up1 = call.stdout[-1].split()
    used = (int(ticks) / 100) / (float(up1) - float(up0))
    # Two busy loops would take both cores of this host; the 1-core quota holds them to one. How much
    # they get below that depends on what else the host runs (measured: 0.37 cores with a load of 11
    # on 2 cores), so only that they ran is asserted below the quota.
    assert 0 < used <= 1.15, f"1 core granted, {used:.2f} cores used"
    (resource,) = call.lines("resource")  # the container's cgroup accounting, as afslet reports it (JSON)
    fields = json.loads(resource)
    assert fields["cpu_seconds"] / fields["wall_seconds"] <= 1.15, resource
    assert fields["cpu_seconds"] == pytest.approx(fields["cpu_user_seconds"] + fields["cpu_system_seconds"], rel=0.05)


def test_admission_runs_two_one_core_calls_and_refuses_a_third(afslet_cluster: AfsletCluster) -> None:
    afslet, tools = afslet_cluster.afslet, afslet_cluster.images["tools"]
    assert sdk_status(afslet) == {"event": "status", "running_containers": 0, "limit_cpu_cores": 2,
                                  "limit_memory_mb": 1024, "used_cpu_cores": 0, "used_memory_mb": 0,
                                  "available_cpu_cores": 2, "available_memory_mb": 1024}
    long_running = [sdk_execute_call(afslet, image=tools, cpu_cores=1, memory_mb=256, timeout_ms=600_000,
                                     command=["/bin/sh", "-c", "echo started; sleep 600"]) for _ in range(2)]
    try:
        for call in long_running:
            call.wait_for(lambda e: e.get("message") == "started")

        status = sdk_status(afslet)
        assert (status["running_containers"], status["used_cpu_cores"], status["used_memory_mb"]) == (2, 2, 512)
        assert (status["available_cpu_cores"], status["available_memory_mb"]) == (0, 512)

        third = sdk_execute(afslet, image=tools, cpu_cores=1, memory_mb=256, timeout_ms=10_000, command=["true"])
        assert third.error is not None and third.error["status"] == "RESOURCE_EXHAUSTED"
        assert "requested cpu_cores=1 memory_mb=256" in third.error["message"]
        assert "available cpu_cores=0 memory_mb=512" in third.error["message"]
        assert third.of("accepted") == []

        too_big = sdk_execute(afslet, image=tools, cpu_cores=3, memory_mb=256, timeout_ms=10_000, command=["true"])
        assert too_big.error is not None and too_big.error["status"] == "RESOURCE_EXHAUSTED"
        assert "exceeds this afslet's limits cpu_cores=2" in too_big.error["message"]

        # A share is held until its call ends, and is free again right after.
        long_running[0].kill()
        afslet_cluster.wait_until_status(lambda s: s.used_cpu_cores == 1 and s.running_containers == 1)
        fourth = sdk_execute(afslet, image=tools, cpu_cores=1, memory_mb=256, timeout_ms=10_000,
                             command=["/bin/sh", "-c", "echo admitted"])
        assert fourth.stdout == ["admitted"]
        status = sdk_status(afslet)
        assert (status["running_containers"], status["used_cpu_cores"], status["available_cpu_cores"]) == (1, 1, 1)
    finally:
        for call in long_running:
            call.kill()
    status = afslet_cluster.wait_idle()
    assert (status.used_cpu_cores, status.used_memory_mb, status.available_cpu_cores,
            status.available_memory_mb) == (0, 0, 2, 1024)


def test_three_one_core_calls_at_the_same_moment_admit_exactly_two(afslet_cluster: AfsletCluster) -> None:
    afslet, tools = afslet_cluster.afslet, afslet_cluster.images["tools"]
    calls = [sdk_execute_call(afslet, image=tools, cpu_cores=1, memory_mb=128, timeout_ms=600_000,
                              command=["/bin/sh", "-c", "echo started; sleep 600"]) for _ in range(3)]
    try:
        outcomes = [call.wait_for(lambda e: e.get("message") == "started" or e["event"] == "error")
                    for call in calls]
        refused = [o for o in outcomes if o["event"] == "error"]
        assert len(refused) == 1 and refused[0]["status"] == "RESOURCE_EXHAUSTED", outcomes
        status = sdk_status(afslet)
        assert (status["running_containers"], status["used_cpu_cores"], status["available_cpu_cores"]) == (2, 2, 0)
    finally:
        for call in calls:
            call.kill()
    afslet_cluster.wait_idle()

