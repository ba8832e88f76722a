"""cffi build script (API mode) for afsd.ondemand.cachefiles._cachefiles_c, run by setup.py at install time.

The kernel's wire structs are declared here once, field for field as in <linux/cachefiles.h>; cffi checks
them against that header when it compiles the module, so a layout mismatch fails the build rather than
corrupting a request at run time. afsd's own helpers are declared in afsd_cachefiles.h.
"""

from pathlib import Path

from cffi import FFI

HERE = Path(__file__).resolve().parent

UAPI_CDEF = """
typedef int... __u8;
typedef int... __u32;
typedef int... __u64;

#define CACHEFILES_MSG_MAX_SIZE ...
#define CACHEFILES_IOC_READ_COMPLETE ...

enum cachefiles_opcode {
    CACHEFILES_OP_OPEN,
    CACHEFILES_OP_CLOSE,
    CACHEFILES_OP_READ,
    ...
};

struct cachefiles_msg {
    __u32 msg_id;
    __u32 opcode;
    __u32 len;
    __u32 object_id;
    __u8  data[];
};

struct cachefiles_open {
    __u32 volume_key_size;
    __u32 cookie_key_size;
    __u32 fd;
    __u32 flags;
    __u8  data[];
};

struct cachefiles_read {
    __u64 off;
    __u64 len;
};
"""

ffibuilder = FFI()
ffibuilder.cdef(UAPI_CDEF + (HERE / "afsd_cachefiles.h").read_text())
ffibuilder.set_source(
    "afsd.ondemand.cachefiles._cachefiles_c",
    "#include <stdint.h>\n#include <sys/types.h>\n#include <linux/cachefiles.h>\n#include \"afsd_cachefiles.h\"\n",
    # Relative to the project root, where setup.py (and so this script) runs.
    sources=["c_ext/cachefiles_shim.c"],
    include_dirs=["c_ext"],
    extra_compile_args=["-O2", "-Wall"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
