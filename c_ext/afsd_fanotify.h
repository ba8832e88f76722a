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

/* One fanotify event as read from a group fd. The kernel's event layout (struct fanotify_event_metadata
 * and its info records) is parsed in C only, here (afsd_parse_events); Python reads these fields. */
struct afsd_event {
    uint64_t mask;
    int32_t fd;                /* open on the accessed file (the reader of these fields answers and closes it), or -1 */
    int32_t pid;
    int32_t has_range;         /* whether a range record came with it (offset and count are 0 if not) */
    uint64_t offset;
    uint64_t count;
};

/* A blob the supervisor serves with a fill fd: an event on its inode may be answered by afsd_take_events. */
struct afsd_served {
    uint64_t dev;
    uint64_t ino;
    uint64_t size;
    int32_t fill_fd;           /* the blob file, read-write (SEEK_HOLE through it raises no event) */
};

/* An event afsd_take_events answered FAN_ALLOW (its range had no hole; its fd is closed), for the caller's
 * bookkeeping: the blob's inode, the range read [start, end) clamped to the blob, and when (CLOCK_MONOTONIC
 * seconds, as Python's time.monotonic) it was read from the group and answered. */
struct afsd_present {
    uint64_t dev;
    uint64_t ino;
    uint64_t start;
    uint64_t end;
    double received;
    double answered;
};

/* The supervisor's event intake: set up once, `served` replaced whenever the blobs served change. */
struct afsd_intake {
    int32_t group_fd;          /* non-blocking */
    int32_t wake_fd;           /* readable when the caller has other work waiting (its epoll fd), or -1 */
    uint32_t linger_us;        /* after answering, wait this long for the next event before returning; 0: never */
    uint32_t budget_us;        /* most time one call spends lingering in all */
    const struct afsd_served *served;
    size_t served_count;
    uint8_t *buffer;           /* what one read of the group fd may fill */
    size_t buffer_size;
    struct afsd_event *events; /* out: the events left to the caller, in the order read, fds open */
    size_t events_capacity;    /* at least buffer_size / 24 + 1 (the smallest event is 24 bytes) */
    struct afsd_present *presents;
    size_t presents_capacity;  /* the same */
    /* out */
    size_t events_count;
    size_t presents_count;
    int32_t more;              /* 1: events may still be queued (a full read, or out of room): call again */
    int32_t error;             /* 0, or -errno of a failed read or -EPROTO for an event that does not parse
                                  (the events before it are in `events`) */
};

/* Split `size` bytes read from a group fd into at most `capacity` events; returns how many. *error gets
 * 0, -EPROTO (a wrong metadata version, a truncated event) or -ENOBUFS (more events than `capacity`); the
 * events parsed before it are returned. */
int afsd_parse_events(const uint8_t *buffer, size_t size, struct afsd_event *events, size_t capacity, int32_t *error);

/* Read the group's queued events: each one on a `served` inode, with a range record, whose range (clamped
 * to the blob) has no hole in its fill fd, is answered FAN_ALLOW and closed here and listed in `presents`;
 * every other one (misses, unknown files, no range, no fd, any error on the way) is left untouched, fd open,
 * in `events`. Returns as soon as a read left an event in `events`; after a read that answered everything,
 * reads on while the queue holds more, then waits up to `linger_us` for the next event (never past
 * `budget_us` after the call began, and not once `wake_fd` turns readable), so a reader's run of present
 * ranges costs the caller one call. Returns 0 or the -errno also stored in `error`. */
int afsd_take_events(struct afsd_intake *intake);
