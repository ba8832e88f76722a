"""The fanotify pre-content backend: lazily filled erofs blobs on Linux 6.14+, crash-safe by design.

Processes: the node daemon (uses `SupervisorClient`, `prepare_blob`, or `FanotifyBackend`) -> the
supervisor (supervisor.py: group fd, marks, pending events) -> fetch workers (worker.py), with the
keeper (keeper.py) holding a second copy of the group and fill fds. docs/fanotify-backend.md tells the
whole story, including what readers see when processes die.
"""

from afsd.ondemand.fanotify.blobfile import BlobFileError, prepare_blob
from afsd.ondemand.fanotify.client import FanotifyBackendError, SupervisorClient
from afsd.ondemand.fanotify.settings import Settings

__all__ = ["BlobFileError", "FanotifyBackendError", "Settings", "SupervisorClient", "prepare_blob"]
