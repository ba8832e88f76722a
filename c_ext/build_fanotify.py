"""cffi build script (API mode) for afsd.ondemand.fanotify._fanotify_c, run by setup.py at install time: the
fanotify supervisor's inline fill (c_ext/fanotify_shim.c, declared in afsd_fanotify.h), linked with OpenSSL's
libcrypto for SHA-256."""

from pathlib import Path

from cffi import FFI

HERE = Path(__file__).resolve().parent

ffibuilder = FFI()
ffibuilder.cdef((HERE / "afsd_fanotify.h").read_text())
ffibuilder.set_source(
    "afsd.ondemand.fanotify._fanotify_c",
    "#include <stdint.h>\n#include <stddef.h>\n#include \"afsd_fanotify.h\"\n",
    # Relative to the project root, where setup.py (and so this script) runs.
    sources=["c_ext/fanotify_shim.c"],
    include_dirs=["c_ext"],
    libraries=["crypto"],
    extra_compile_args=["-O2", "-Wall"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
