/*
 * afsd's own C helpers around the cachefiles on-demand protocol (see cachefiles_shim.c).
 *
 * This file is read twice: by the C compiler (included by cachefiles_shim.c) and by cffi as part of the
 * cdef (c_ext/build_cachefiles.py), so it holds only declarations both understand: no preprocessor.
 * The kernel's own structs (struct cachefiles_msg/_open/_read) are declared in the cdef in
 * build_cachefiles.py and checked by cffi against <linux/cachefiles.h> when the module is compiled.
 */

/* One request read from /dev/cachefiles, flattened. Key offsets point into the caller's buffer. */
struct afsd_request {
    uint32_t msg_id;
    uint32_t opcode;            /* CACHEFILES_OP_OPEN / _CLOSE / _READ */
    uint32_t length;            /* bytes of the whole message */
    uint32_t object_id;
    int32_t anon_fd;            /* OPEN: the anonymous fd installed in our fd table (close-on-exec set); else -1 */
    uint32_t volume_key_offset; /* OPEN: the volume key ("erofs,<domain or fsid>"), NUL stripped */
    uint32_t volume_key_size;
    uint32_t cookie_key_offset; /* OPEN: the cookie key (the fsid or device tag) */
    uint32_t cookie_key_size;
    uint64_t offset;            /* READ: the range the kernel misses */
    uint64_t count;
};

/* Parse one message; 0, or -EBADMSG when it is shorter than its header or payload say. */
int afsd_parse_request(const uint8_t *buffer, size_t size, struct afsd_request *request);

/* read() one message from the device fd into `buffer` and parse it. Returns the message length, 0 when no
 * request is pending, or -errno. An OPEN's anon fd is made close-on-exec before this returns. A malformed
 * OPEN returns -EBADMSG after its anon fd was closed and the OPEN failed (`copen <id>,-EBADMSG`). */
ssize_t afsd_read_request(int device_fd, uint8_t *buffer, size_t size, struct afsd_request *request);

/* CACHEFILES_IOC_READ_COMPLETE on an object's anon fd: 0 or -errno. msg_id is unsigned (ids reach 2^32-1). */
int afsd_read_complete(int anon_fd, unsigned long msg_id);

/* pwrite `size` bytes of `data` at page-aligned `offset` through a page-aligned per-thread buffer (the kernel
 * writes the cache file with direct I/O), zero-padding the last page. Returns bytes of `data` written, or
 * -errno (-EINVAL for an unaligned offset, -ENOMEM when no buffer could be allocated). */
ssize_t afsd_pwrite_aligned(int fd, const uint8_t *data, size_t size, uint64_t offset);

/* The piece size of afsd_pwrite_aligned (its per-thread buffer). */
size_t afsd_write_piece_size(void);
