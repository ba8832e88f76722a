"""The on-demand backends by name, written once: the order `--backend auto` prefers them in, and how to
get each backend's class. The node daemon (afsd/node/), its command line (`afsd node --backend`, `afsd
mount --backend`) and its backend set all read this list. Importing it is cheap: a backend's module is
imported only when its class is asked for.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from afsd.ondemand.base import Backend

# name -> "module:class", in the order `auto` prefers them (fastest first for a kernel that has them all).
_BACKENDS = {
    "fanotify": "afsd.ondemand.fanotify.backend:FanotifyBackend",
    "fscache": "afsd.ondemand.cachefiles.backend:FscacheBackend",
    "eager": "afsd.ondemand.eager:EagerBackend",
}
BACKEND_NAMES: tuple[str, ...] = tuple(_BACKENDS)


def backend_class(name: str) -> type[Backend]:
    """The backend called `name` (KeyError for a name not in BACKEND_NAMES)."""
    module, _, attribute = _BACKENDS[name].partition(":")
    backend: type[Backend] = getattr(importlib.import_module(module), attribute)
    return backend
