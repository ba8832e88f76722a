"""The cachefiles on-demand backend ("fscache"): erofs blobs mounted with `-o fsid=NAME`, whose cache
misses the kernel asks us to fill through /dev/cachefiles (Linux 5.19+, crash recovery 6.8+).

Processes: the node daemon (`FscacheBackend`, or `FscacheClient` directly) -> the supervisor
(supervisor.py: holds the device, the blob registrations, and the worker) -> the worker (worker.py: the
request loop, fetching verified ranges and writing them through the C shim in c_ext/). The whole story,
including what readers see when a process dies, is in docs/cachefiles-backend.md.
"""

from afsd.ondemand.cachefiles.client import FscacheBackendError, FscacheClient
from afsd.ondemand.cachefiles.device import CachefilesError
from afsd.ondemand.cachefiles.mount import FscacheMountError, fscache_mounts, mount_fscache
from afsd.ondemand.cachefiles.settings import Settings

__all__ = ["CachefilesError", "FscacheBackendError", "FscacheClient", "FscacheMountError", "Settings",
           "fscache_mounts", "mount_fscache"]
