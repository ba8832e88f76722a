"""afslet (`afsd let`): the Execute service. Runs a command in an image's root filesystem under runc,
with CPU/memory/GPU admission, and streams back its output and what it wrote.

Data flow of one Execute call (`session.py` drives it):

    client frames ──► request.py (start frame: validation)  ──► admission.py (cpu/memory shares)
                  └─► extra_files.py (file_begin/chunk/end, written safely under the session's extra dir)
    discovery ResolveImage ──► process.py (entrypoint/cmd/env/working dir, Docker's rules)
    node daemon Mount (node_mounts.py): image layers + extra dir + writable upper ──► rootfs
    users.py (user from the rootfs's /etc/passwd, /etc/group) ──► bundle.py (OCI config.json)
    container.py: `runc run -d` (runc.py), output pumped line by line (output.py), exit awaited through
        the subreaper (reaper.py); stopped, when it must be, by the staged abort (stopping.py);
        use read from the cgroup (cgroups.py, resources.py) ──► outcome.py (exit codes)
    upper_tar.py: gzip tar of the writable upper ──► tar_header/tar_chunk frames ──► done

Every call is an execution (executions.py, with its log tail in log_tail.py) that execution management
lists, shows and stops (`afsd.executions.v1.Executions`, management.py). `service.py` is the gRPC face of
`afsletpb.Afslet`; `daemon.py` runs the whole (start, serve, drain on SIGTERM, stop); `recovery.py` cleans
what a crashed afslet left.
"""
