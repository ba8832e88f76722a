/*
 * afsd's C helper for the fanotify supervisor's misses filled from a file on this machine (fanotify_shim.c).
 *
 * Read twice: by the C compiler (included by fanotify_shim.c) and by cffi as the cdef
 * (c_ext/build_fanotify.py), so it holds only declarations both understand: no preprocessor.
 */

/* One blob the supervisor fills itself (set up once), and the event at hand (set per call). */
struct afsd_local_blob {
    int32_t group_fd;          /* the fanotify group the answer goes to */
    int32_t fill_fd;           /* the blob file, read-write, opened before its mark (writes raise no event) */
    int32_t source_fd;         /* the complete copy on this machine */
    uint32_t chunk_size;
    uint64_t size;             /* the blob's size (its last chunk may be short) */
    uint64_t limit;            /* most bytes one event may have filled here; more: left to the caller */
    const uint8_t *digests;    /* the chunks' SHA-256 digests, 32 bytes each, chunk 0 first */
    size_t digests_size;
    /* the event */
    int32_t event_fd;
    uint64_t start;            /* [start, end): the bytes it reads, within the blob */
    uint64_t end;
    /* out */
    int64_t written;           /* bytes filled (written into holes) */
    uint64_t filled_start;     /* the whole chunks filled, or to be filled: [filled_start, filled_end) */
    uint64_t filled_end;
};

/* Serve one journaled event of the blob: when [start, end) has no hole, answer FAN_ALLOW and return 1;
 * else fill the whole chunks under its holes (each chunk pread from source_fd, its SHA-256 checked, and
 * only the parts of it that are holes in fill_fd pwritten: bytes a reader may see are never rewritten),
 * check that [start, end) has no hole left, answer FAN_ALLOW, return 2. Returns 0 when the chunks to fill
 * exceed `limit` (nothing done, nothing answered), or -errno when the fill failed or left a hole (the event
 * is not answered): -EBADMSG a chunk does not match its digest (nothing of it written), -ENODATA the copy
 * ends early, -EINVAL a range outside the digests, -EAGAIN a hole is left, else a syscall's errno. */
int afsd_serve_local(struct afsd_local_blob *blob);

/* Fill the whole chunks [offset, end) of the blob (as afsd_serve_local does, without an event): the bytes
 * written, or -errno (-EINVAL when [offset, end) is not whole chunks of the blob). */
int64_t afsd_fill_local(struct afsd_local_blob *blob, uint64_t offset, uint64_t end);
