"""`afsd let` runs commands the way afs-sdk users expect: output streamed line by line, the command's
real exit code, the image's runtime config applied the Docker way, extra files in place, and the
writable layer returned as a tar.gz. Driven with the published afs-sdk client against a real afslet,
node daemon, layerstore, discovery and registry; every test ends with nothing left on the node."""

from __future__ import annotations

import socket
import stat
import time

import pytest

from afsd.afslet import cgroups
from tests.support.afslet import (
    AfsletCluster,
    file_entry,
    module_cluster,
    sdk_execute,
    sdk_execute_call,
    sdk_raw,
)
from tests.support.overlay import volatile_overlay_options

pytestmark = pytest.mark.usefixtures("nothing_left_behind")

afslet_cluster = module_cluster("afslet-execute", with_debian=True)


DEBIAN_SCRIPT = ("echo hello from $(cat /etc/debian_version | cut -d. -f1 | sed s/^/debian-/); "
                 "echo new file > /root/new.txt; echo appended >> /etc/motd; rm /etc/hostname")


def test_echo_in_debian_streams_output_and_returns_what_it_wrote(afslet_cluster: AfsletCluster) -> None:
    assert afslet_cluster.debian_source == "debootstrap", f"no real Debian image: {afslet_cluster.debian_source}"
    image = afslet_cluster.images["debian"]
    call = sdk_execute(afslet_cluster.afslet, image=image, command=["/bin/bash", "-c", DEBIAN_SCRIPT],
                       timeout_ms=60_000)

    assert call.error is None, call.error
    assert call.kinds[0] == "accepted" and call.kinds[-1] == "done"
    assert call.kinds.index("result") < call.kinds.index("tar_start")
    assert call.stdout == ["hello from debian-12"]
    assert call.stderr == []
    assert call.result == {"event": "result", "success": True, "exit_code": 0, "error": ""}
    assert call.of("tar_start")[0]["name"] == "writable-upper.tar.gz"
    files = call.files()
    assert files["root/new.txt"] == b"new file\n"
    assert files["etc/motd"] == b"layer 3 was here\nappended\n"  # the image's motd, modified
    assert set(files) == {"root/new.txt", "etc/motd"}

    # The SDK's parser skips whiteouts; the raw archive shows the deletion as a 0/0 character device.
    raw = sdk_raw(afslet_cluster.afslet, [{"start": {"image": image, "command": ["/bin/bash", "-c", DEBIAN_SCRIPT],
                                                     "cpu_cores": 1, "memory_mb": 256, "timeout_ms": 60_000}}])
    assert raw.result["exit_code"] == 0
    members = raw.tar_members()
    whiteout = members["etc/hostname"]
    assert whiteout.ischr() and (whiteout.devmajor, whiteout.devminor) == (0, 0)
    assert members["root/new.txt"].isreg() and members["etc"].isdir()


@pytest.mark.parametrize(("script", "exit_code", "error"), [
    ("echo out; echo err >&2; exit 7", 7, "exited with code 7"),
    ("sh -c 'kill -TERM $$'; exit $?", 143, "killed by SIGTERM"),  # not the container's init, which ignores it
    ("/no/such/program", 127, "exited with code 127"),  # the shell's own 127
])
def test_exit_code_is_the_commands_own(afslet_cluster: AfsletCluster, script: str, exit_code: int,
                                       error: str) -> None:
    call = sdk_execute(afslet_cluster.afslet, image=afslet_cluster.images["tools"],
                       command=["/bin/sh", "-c", script], timeout_ms=10_000)
    assert (call.result["success"], call.result["exit_code"]) == (False, exit_code)
    assert error in call.result["error"]
    assert "out" not in call.result["error"]  # output stays in the log frames
    assert call.kinds[-1] == "done"


@pytest.mark.parametrize(("command", "exit_code", "error"), [
    (["/no/such/program"], 127, "no such file or directory"),
    (["/srv/data/keep.txt"], 126, "permission denied"),
])
def test_a_command_that_cannot_start_gets_dockers_codes(afslet_cluster: AfsletCluster, command: list[str],
                                                        exit_code: int, error: str) -> None:
    call = sdk_execute(afslet_cluster.afslet, image=afslet_cluster.images["tools"], command=command,
                       timeout_ms=10_000)
    assert (call.result["success"], call.result["exit_code"]) == (False, exit_code)
    assert error in call.result["error"]
    assert call.stderr == []  # runc's complaint is the result's error, not the command's stderr
    assert call.kinds[-1] == "done"


def test_output_is_streamed_line_by_line_while_the_command_runs(afslet_cluster: AfsletCluster) -> None:
    port = 7777
    # The command blocks in `nc -l` until the test connects: "second" cannot exist before that.
    script = f"echo first; echo warning >&2; nc -l -p {port}; echo second; printf 'no newline at the end'"
    call = sdk_execute_call(afslet_cluster.afslet, image=afslet_cluster.images["tools"],
                            command=["/bin/sh", "-c", script], timeout_ms=120_000)
    call.wait_for(lambda e: e["event"] == "log" and e["source"] == "runc:stdout")
    assert [e["message"] for e in call.events if e.get("source") == "runc:stdout"] == ["first"]
    assert not any(e["event"] == "result" for e in call.events)
    # The container is on afslet's bridge (the default network); the host reaches its address there.
    (network,) = [e["message"] for e in call.events if e.get("source") == "network"]
    address = network.split()[1].split("/")[0]

    deadline = time.monotonic() + 30
    while True:
        try:
            with socket.create_connection((address, port), timeout=1) as connection:
                connection.sendall(b"over the network\n")
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    result = call.finish()
    assert result.stdout == ["first", "over the network", "second", "no newline at the end"]
    assert result.stderr == ["warning"]
    assert result.result["exit_code"] == 0


def test_extra_files_appear_with_their_modes_and_a_script_runs_as_the_command(
        afslet_cluster: AfsletCluster) -> None:
    extra = [
        {"kind": "dir", "path": "opt/tools", "mode": 0o750, "uid": 1000, "gid": 50},
        file_entry("opt/tools/run.sh", b"#!/bin/sh\necho script ran with \"$@\" as $(id -u)\n", mode=0o755),
        file_entry("/opt/tools/conf/deep/settings.txt", b"x=1\n", mode=0o600, uid=1000, gid=1000,
                   mtime_unix=1_600_000_000),
        {"kind": "symlink", "path": "usr/local/bin/run", "target": "/opt/tools/run.sh"},
    ]
    call = sdk_execute(afslet_cluster.afslet, image=afslet_cluster.images["tools"], extra_entries=extra,
                       command=["/opt/tools/run.sh", "one", "two"], timeout_ms=10_000)
    assert call.result["exit_code"] == 0, call.result
    assert call.stdout == ["script ran with one two as 0"]

    inspect = ("/usr/local/bin/run via-symlink; readlink /usr/local/bin/run; "
               "stat -c '%n %a %u:%g %F' /opt/tools /opt/tools/run.sh /opt/tools/conf/deep/settings.txt; "
               "stat -c %Y /opt/tools/conf/deep/settings.txt; cat /opt/tools/conf/deep/settings.txt")
    call = sdk_execute(afslet_cluster.afslet, image=afslet_cluster.images["tools"], extra_entries=extra,
                       command=["/bin/sh", "-c", inspect], timeout_ms=10_000)
    assert call.result["exit_code"] == 0, call.result
    assert call.stdout == [
        "script ran with via-symlink as 0",
        "/opt/tools/run.sh",
        "/opt/tools 750 1000:50 directory",
        "/opt/tools/run.sh 755 0:0 regular file",
        "/opt/tools/conf/deep/settings.txt 600 1000:1000 regular file",
        "1600000000",
        "x=1",
    ]
    # Extra files live in a read-only layer below the upper: the returned layer holds only writes.
    assert call.files() == {}


def test_image_config_and_request_env_follow_docker(afslet_cluster: AfsletCluster) -> None:
    app = afslet_cluster.images["appuser"]   # Entrypoint ["/bin/sh", "-c"], Cmd, User app, WorkingDir srv/data
    default = sdk_execute(afslet_cluster.afslet, image=app, timeout_ms=10_000)
    assert default.stdout == ["from-image-cmd"]

    script = "id -u; id -g; id -G; pwd; echo $GREETING $KEEP $EXTRA; echo $HOME; echo $PATH"
    call = sdk_execute(afslet_cluster.afslet, image=app, command=[script], timeout_ms=10_000,
                       env={"GREETING": "from-request", "EXTRA": "added"})
    uid, gid, groups, cwd, env_line, home, path = call.stdout
    assert (uid, gid, cwd, home) == ("1000", "1000", "/srv/data", "/home/app")
    assert set(groups.split()) == {"1000", "29", "50"}  # app's own group plus audio and staff from /etc/group
    assert env_line == "from-request image-only added"
    assert path == "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

    tools = afslet_cluster.images["tools"]  # no User: root; Cmd only; WorkingDir /srv
    root = sdk_execute(afslet_cluster.afslet, image=tools, timeout_ms=10_000)
    assert root.stdout == ["default command in /srv as root"]
    custom = sdk_execute(afslet_cluster.afslet, image=tools, command=["/bin/sh", "-c", "echo $PATH; echo $HOME"],
                         env=["PATH=/bin:/custom"], timeout_ms=10_000)
    assert custom.stdout == ["/bin:/custom", "/root"]


def test_a_setup_failure_is_a_result_with_code_125(afslet_cluster: AfsletCluster) -> None:
    missing = afslet_cluster.images["tools"].rsplit(":", 1)[0] + ":no-such-tag"
    call = sdk_execute(afslet_cluster.afslet, image=missing, command=["true"], timeout_ms=10_000)
    assert (call.result["success"], call.result["exit_code"]) == (False, 125)
    assert "no-such-tag" in call.result["error"]
    # then, as always, the (empty) writable layer and done
    assert call.kinds.index("result") < call.kinds.index("tar_start") < call.kinds.index("done") == len(call.kinds) - 1
    assert call.files() == {}


def test_the_tar_keeps_modes_symlinks_and_opaque_directories(afslet_cluster: AfsletCluster) -> None:
    script = ("mkdir -p /srv/made/sub && echo x > /srv/made/sub/f && chmod 751 /srv/made && "
              "ln -s /srv/made/sub/f /srv/link && rm -r /srv/data/old-dir && mkdir /srv/data/old-dir && "
              "echo fresh > /srv/data/old-dir/new.txt && echo changed > /srv/data/modify-me.txt")
    raw = sdk_raw(afslet_cluster.afslet, [{"start": {"image": afslet_cluster.images["tools"],
                                                     "command": ["/bin/sh", "-c", script], "cpu_cores": 1,
                                                     "memory_mb": 64, "timeout_ms": 10_000}}])
    assert raw.result["exit_code"] == 0, raw.result
    members = raw.tar_members()
    assert stat.S_IMODE(members["srv/made"].mode) == 0o751
    assert members["srv/link"].issym() and members["srv/link"].linkname == "/srv/made/sub/f"
    assert members["srv/data/old-dir"].pax_headers.get("SCHILY.xattrs.trusted.overlay.opaque") == "y"
    assert "srv/data/old-dir/inside.txt" not in members
    assert {"srv/data/old-dir/new.txt", "srv/data/modify-me.txt", "srv/made/sub/f"} <= set(members)
    assert "srv/data/keep.txt" not in members  # untouched files are not in the writable layer


def test_the_container_sees_the_hosts_resolv_conf(afslet_cluster: AfsletCluster) -> None:
    call = sdk_execute(afslet_cluster.afslet, image=afslet_cluster.images["tools"], timeout_ms=30_000,
                       command=["cat", "/etc/resolv.conf"])
    assert call.result["exit_code"] == 0, call.result
    with open("/etc/resolv.conf") as host:
        assert call.stdout == [line.rstrip("\n") for line in host if line.strip()]


def test_the_writable_layer_is_volatile_scratch_and_still_comes_back(afslet_cluster: AfsletCluster) -> None:
    """The container's root is an overlay whose upper is volatile (unmounting it at teardown does not sync
    the node's disk); what the command wrote, fsync or not, still comes back in the tar."""
    script = "grep ' / / ' /proc/self/mountinfo; echo kept > /kept.txt; sync"
    call = sdk_execute(afslet_cluster.afslet, image=afslet_cluster.images["tools"], timeout_ms=60_000,
                       command=["/bin/sh", "-c", script])
    assert call.error is None and call.result["exit_code"] == 0, (call.error, call.stderr)
    (root,) = call.stdout
    fstype, _source, options = root.split(" - ", 1)[1].split()
    assert fstype == "overlay" and volatile_overlay_options(options), root
    assert call.files()["kept.txt"] == b"kept\n"


def test_the_containers_cgroup_has_a_pids_limit(afslet_cluster: AfsletCluster) -> None:
    afslet = afslet_cluster.afslet
    parent = afslet.args[afslet.args.index("--cgroup-parent") + 1]
    call = sdk_execute_call(afslet, image=afslet_cluster.images["tools"], timeout_ms=60_000,
                            command=["/bin/sh", "-c", "echo started; sleep 60"])
    try:
        call.wait_for(lambda e: e.get("message") == "started")
        (container,) = cgroups.children(parent)    # in every hierarchy: v1 pids controller or cgroup2
        limits = {d.read_text().strip() for d in (p / "pids.max" for p in cgroups.directories(container)) if d.exists()}
        assert limits == {"4096"}, limits          # afsd let's default: a fork bomb stops there
    finally:
        call.kill()
