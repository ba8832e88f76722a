"""The fanotify backend's C helper (c_ext/fanotify_shim.c through cffi, built when afsd is installed),
imported in one place: the event parser (_sys.py), the event intake (intake.py) and the inline fill
(inline.py) use it. Not optional: without it the backend would parse the kernel's events a second way."""

from __future__ import annotations

try:
    from afsd.ondemand.fanotify._fanotify_c import ffi, lib
except ImportError as error:  # pragma: no cover - only on a broken install
    raise ImportError(f"afsd's fanotify shim is not compiled ({error}): reinstall afsd "
                      "(`.venv/bin/pip install -e .` or scripts/setup.sh) with gcc, python3-dev, libffi-dev and "
                      "libssl-dev") from None

__all__ = ["ffi", "lib"]
