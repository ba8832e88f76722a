"""The fscache backend's counters: their names and meanings, in one place.

The worker counts what it does (cumulative per worker process) and reports it to the supervisor, which
adds up the workers it ran and its own restart counts; `status` returns the sums, the node daemon shows
them (`FscacheBackend.counters`) and metrics.py turns them into Prometheus metrics.
"""

from __future__ import annotations

WORKER_COUNTERS = {
    "requests_open": "OPEN requests read from /dev/cachefiles",
    "requests_read": "READ requests read from /dev/cachefiles",
    "requests_close": "CLOSE requests read from /dev/cachefiles",
    "opens_unknown": "OPENs of blobs nobody registered (failed with ENOENT)",
    "opens_failed": "OPENs whose copen the kernel refused",
    "reads_failed": "READs completed without data because every source failed (the reader got EIO)",
    "reads_orphaned": "READs for an object this worker never opened (cannot be answered)",
    "bytes_demand": "bytes written into cache files for READs (and ahead of sequential readers)",
    "read_ahead_bytes": "of bytes_demand, those filled ahead of a sequential reader before it asked",
    "reads_present": "READs whose range a fill ahead of the reader had written by the time they were taken",
    "bytes_prefetch": "bytes written into cache files by background prefetch",
    "learned_blobs": "blobs opened with a learned prefetch (what the cluster learned readers read first)",
    "learned_bytes_prefetched": "bytes of learned ranges fetched before readers asked (read units)",
    "restores": "times a worker asked the kernel to re-deliver unanswered requests (restore)",
    "blobs_completed": "blobs whose cache file became whole",
}

SUPERVISOR_COUNTERS = {
    "worker_restarts": "workers replaced, for any reason",
    "worker_deaths": "workers that died on their own (crash, kill -9)",
    "worker_hangs": "workers killed because they stopped reporting",
    "worker_upgrades": "workers replaced on request (restart-worker)",
}
