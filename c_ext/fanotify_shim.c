/*
 * The fanotify supervisor's misses filled from a file on this machine, in C (afsd/ondemand/fanotify/inline.py
 * calls it through cffi, once per event).
 *
 * Why C: a cold 4 KiB miss served from a local file costs one disk read and a few syscalls, and the reader
 * waits for all of it; in Python the steps around that disk read (hole lookups, planning, the checked read,
 * the hole-only write, the answer) took about as long again as the read itself (docs/fanotify-backend.md).
 * The steps are the supervisor's own, in the same order: SEEK_HOLE for the range, pread of the chunks under
 * its holes, SHA-256 of each against the chunk table (OpenSSL's EVP, as hashlib), pwrite of the holes only,
 * SEEK_HOLE again, and FAN_ALLOW only when the range has no hole. The caller journals the event before
 * and clears it after, and handles every other case (fills in flight, recent failures, fetch workers).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <poll.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/fanotify.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <time.h>
#include <unistd.h>

#include <openssl/evp.h>

#include "afsd_fanotify.h"

#define DIGEST_SIZE 32

/* The range record of a pre-content event (uapi <linux/fanotify.h>, Linux 6.14+; older headers lack it). */
#ifndef FAN_EVENT_INFO_TYPE_RANGE
#define FAN_EVENT_INFO_TYPE_RANGE 6
struct fanotify_event_info_range {
    struct fanotify_event_info_header hdr;
    uint32_t pad;
    uint64_t offset;
    uint64_t count;
};
#endif

/* One buffer per thread, grown to the largest chunk asked for (the supervisor calls from one thread). */
static __thread uint8_t *chunk_buffer;
static __thread size_t chunk_buffer_size;

static uint8_t *buffer_of(size_t size) {
    if (chunk_buffer_size < size) {
        uint8_t *grown = realloc(chunk_buffer, size);
        if (grown == NULL)
            return NULL;
        chunk_buffer = grown;
        chunk_buffer_size = size;
    }
    return chunk_buffer;
}

static int read_exactly(int fd, uint8_t *buffer, size_t count, uint64_t offset) {
    size_t done = 0;
    while (done < count) {
        ssize_t got = pread(fd, buffer + done, count - done, (off_t)(offset + done));
        if (got < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        if (got == 0)
            return -ENODATA;
        done += (size_t)got;
    }
    return 0;
}

static int write_all(int fd, const uint8_t *data, size_t count, uint64_t offset) {
    size_t done = 0;
    while (done < count) {
        ssize_t put = pwrite(fd, data + done, count - done, (off_t)(offset + done));
        if (put < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        done += (size_t)put;
    }
    return 0;
}

/* The first hole of [start, end) in fd, `end` if none, or -errno. */
static int64_t first_hole(int fd, uint64_t start, uint64_t end) {
    if (start >= end)
        return (int64_t)end;
    off_t hole = lseek(fd, (off_t)start, SEEK_HOLE);
    if (hole < 0)
        return errno == ENXIO ? (int64_t)start : -errno;
    return (uint64_t)hole < end ? (int64_t)hole : (int64_t)end;
}

/* The end of the hole at `hole` (where data starts again), capped at `end`, or -errno. */
static int64_t hole_end(int fd, uint64_t hole, uint64_t end) {
    off_t data_at = lseek(fd, (off_t)hole, SEEK_DATA);
    if (data_at < 0)
        return errno == ENXIO ? (int64_t)end : -errno;
    return (uint64_t)data_at < end ? (int64_t)data_at : (int64_t)end;
}

/* pwrite the parts of [start, end) that are holes in `fd`; `data` holds the bytes of [start, end).
 * Returns the bytes written or -errno (as afsd.ondemand.sparse.write_holes). */
static int64_t write_holes(int fd, const uint8_t *data, uint64_t start, uint64_t end) {
    int64_t written = 0;
    uint64_t position = start;
    while (position < end) {
        int64_t hole = first_hole(fd, position, end);
        if (hole < 0)
            return hole;
        if ((uint64_t)hole == end)
            break;
        int64_t stop = hole_end(fd, (uint64_t)hole, end);
        if (stop < 0)
            return stop;
        int error = write_all(fd, data + ((uint64_t)hole - start), (uint64_t)stop - (uint64_t)hole, (uint64_t)hole);
        if (error)
            return error;
        written += stop - hole;
        position = (uint64_t)stop;
    }
    return written;
}

/* Fill the whole chunks [offset, end) from the copy, checked; the bytes written, or -errno. */
static int64_t fill_chunks(const struct afsd_local_blob *blob, uint64_t offset, uint64_t end) {
    uint32_t chunk_size = blob->chunk_size;
    uint8_t *buffer = buffer_of(chunk_size);
    if (buffer == NULL)
        return -ENOMEM;
    int64_t written = 0;
    for (uint64_t at = offset; at < end; at += chunk_size) {
        uint64_t index = at / chunk_size;
        size_t count = (size_t)(end - at < chunk_size ? end - at : chunk_size);
        if ((index + 1) * DIGEST_SIZE > blob->digests_size)
            return -EINVAL;
        int error = read_exactly(blob->source_fd, buffer, count, at);
        if (error)
            return error;
        uint8_t digest[EVP_MAX_MD_SIZE];
        unsigned int digest_size = 0;
        if (!EVP_Digest(buffer, count, digest, &digest_size, EVP_sha256(), NULL) || digest_size != DIGEST_SIZE)
            return -ENOMEM;
        if (memcmp(digest, blob->digests + index * DIGEST_SIZE, DIGEST_SIZE) != 0)
            return -EBADMSG;
        int64_t put = write_holes(blob->fill_fd, buffer, at, at + count);
        if (put < 0)
            return put;
        written += put;
    }
    return written;
}

static int answer_allow(int group_fd, int event_fd) {
    struct fanotify_response answer = {.fd = event_fd, .response = FAN_ALLOW};
    return write(group_fd, &answer, sizeof answer) == sizeof answer ? 0 : -errno;
}

int afsd_serve_local(struct afsd_local_blob *blob) {
    blob->written = 0;
    blob->filled_start = blob->filled_end = 0;
    if (blob->chunk_size == 0 || blob->start > blob->end || blob->end > blob->size)
        return -EINVAL;
    int64_t hole = first_hole(blob->fill_fd, blob->start, blob->end);
    if (hole < 0)
        return (int)hole;
    if ((uint64_t)hole == blob->end) {
        int error = answer_allow(blob->group_fd, blob->event_fd);
        return error ? error : 1;
    }
    /* The chunks under the holes: from the first hole's chunk to the last hole's, as whole chunks
     * (chunks in between that are present cost a read, and are written nowhere: only holes are). */
    uint64_t chunk = blob->chunk_size;
    uint64_t first = (uint64_t)hole / chunk * chunk, last_end = (uint64_t)hole + 1;
    /* (a range within one chunk, the common miss, needs no walk: that chunk is the one to fill) */
    for (uint64_t position = first + chunk < blob->end ? (uint64_t)hole : blob->end; position < blob->end;) {
        int64_t stop = hole_end(blob->fill_fd, position, blob->end);
        if (stop < 0)
            return (int)stop;
        last_end = (uint64_t)stop;
        if (last_end - first > blob->limit)
            break;                      /* too large already: the caller's */
        int64_t next = first_hole(blob->fill_fd, (uint64_t)stop, blob->end);
        if (next < 0)
            return (int)next;
        position = (uint64_t)next;
    }
    uint64_t end = (last_end + chunk - 1) / chunk * chunk;
    if (end > blob->size)
        end = blob->size;
    blob->filled_start = first;
    blob->filled_end = end;
    if (end - first > blob->limit)
        return 0;
    int64_t written = fill_chunks(blob, first, end);
    if (written < 0)
        return (int)written;
    blob->written = written;
    hole = first_hole(blob->fill_fd, blob->start, blob->end);   /* the one rule: no reader onto a hole */
    if (hole < 0)
        return (int)hole;
    if ((uint64_t)hole != blob->end)
        return -EAGAIN;
    int error = answer_allow(blob->group_fd, blob->event_fd);
    return error ? error : 2;
}

int64_t afsd_fill_local(struct afsd_local_blob *blob, uint64_t offset, uint64_t end) {
    if (blob->chunk_size == 0 || offset % blob->chunk_size || offset > end || end > blob->size
        || (end % blob->chunk_size && end != blob->size))
        return -EINVAL;
    return fill_chunks(blob, offset, end);
}

/* == the event intake (afsd/ondemand/fanotify/intake.py) ====================================================
 *
 * Why C: a learned start raises hundreds of events whose range the learned stream already filled; in Python
 * each cost a loop round (read, parse, fstat, lookup, SEEK_HOLE, answer, close) before the reader could go
 * on, and the bookkeeping after it held up the next one. Here the answer is a few syscalls, and the
 * bookkeeping waits until the run of present reads pauses. The rule is the supervisor's: a reader is let
 * onto a range of a blob we serve only when that range has no hole; anything else is Python's. */

int afsd_parse_events(const uint8_t *buffer, size_t size, struct afsd_event *events, size_t capacity, int32_t *error) {
    size_t position = 0, count = 0;
    *error = 0;
    while (size - position >= sizeof(struct fanotify_event_metadata)) {
        struct fanotify_event_metadata metadata;
        memcpy(&metadata, buffer + position, sizeof metadata);
        if (metadata.vers != FANOTIFY_METADATA_VERSION || metadata.event_len < sizeof metadata
            || metadata.metadata_len < sizeof metadata || metadata.event_len < metadata.metadata_len
            || metadata.event_len > size - position) {
            *error = -EPROTO;
            break;
        }
        if (count == capacity) {
            *error = -ENOBUFS;
            break;
        }
        struct afsd_event *event = &events[count++];
        *event = (struct afsd_event){.mask = metadata.mask, .fd = metadata.fd, .pid = metadata.pid};
        size_t info = position + metadata.metadata_len, stop = position + metadata.event_len;
        while (stop - info >= sizeof(struct fanotify_event_info_header)) {
            struct fanotify_event_info_header header;
            memcpy(&header, buffer + info, sizeof header);
            if (header.len < sizeof header || header.len > stop - info)
                break;
            if (header.info_type == FAN_EVENT_INFO_TYPE_RANGE && header.len >= sizeof(struct fanotify_event_info_range)) {
                struct fanotify_event_info_range range;
                memcpy(&range, buffer + info, sizeof range);
                event->has_range = 1;
                event->offset = range.offset;
                event->count = range.count;
            }
            info += header.len;
        }
        position += metadata.event_len;
    }
    return (int)count;
}

static double monotonic_seconds(void) {
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    return (double)now.tv_sec + (double)now.tv_nsec / 1e9;
}

/* Answer `event` FAN_ALLOW and close its fd if it reads a range of a served blob with no hole, filling
 * `present`; 0 (nothing done) otherwise. */
static int answer_if_present(const struct afsd_intake *intake, const struct afsd_event *event,
                             struct afsd_present *present) {
    if (event->fd < 0 || !event->has_range)
        return 0;
    struct stat st;
    if (fstat(event->fd, &st) != 0)
        return 0;
    const struct afsd_served *blob = NULL;
    for (size_t i = 0; i < intake->served_count && blob == NULL; i++)
        if (intake->served[i].ino == (uint64_t)st.st_ino && intake->served[i].dev == (uint64_t)st.st_dev)
            blob = &intake->served[i];
    if (blob == NULL || blob->fill_fd < 0)
        return 0;
    uint64_t start = event->offset < blob->size ? event->offset : blob->size;
    uint64_t end = event->count < blob->size - start ? start + event->count : blob->size;
    if (first_hole(blob->fill_fd, start, end) != (int64_t)end)
        return 0;
    if (answer_allow(intake->group_fd, event->fd) != 0)
        return 0;               /* the caller answers it (again) and says why */
    close(event->fd);
    *present = (struct afsd_present){.dev = (uint64_t)st.st_dev, .ino = (uint64_t)st.st_ino, .start = start, .end = end};
    return 1;
}

/* Wait up to `seconds` for the group to be readable; 0 when it did not (quiet, or the caller has work). */
static int linger(const struct afsd_intake *intake, double seconds) {
    struct pollfd fds[2] = {{.fd = intake->group_fd, .events = POLLIN}, {.fd = intake->wake_fd, .events = POLLIN}};
    struct timespec timeout = {.tv_sec = (time_t)seconds, .tv_nsec = (long)((seconds - (double)(time_t)seconds) * 1e9)};
    int ready = ppoll(fds, 2, &timeout, NULL);
    return ready > 0 && (fds[0].revents & POLLIN);
}

int afsd_take_events(struct afsd_intake *intake) {
    intake->events_count = intake->presents_count = 0;
    intake->more = intake->error = 0;
    size_t most_per_read = intake->buffer_size / sizeof(struct fanotify_event_metadata) + 1;
    double deadline = monotonic_seconds() + intake->budget_us / 1e6;
    int drained = 0;   /* the queue is most likely empty (a read to learn EAGAIN costs as much as a poll) */
    for (;;) {
        if (intake->events_capacity - intake->events_count < most_per_read
            || intake->presents_capacity - intake->presents_count < most_per_read) {
            intake->more = 1;
            return 0;
        }
        if (drained) {
            double left = deadline - monotonic_seconds();
            if (intake->presents_count == 0 || intake->linger_us == 0 || left <= 0)
                return 0;
            if (!linger(intake, left < intake->linger_us / 1e6 ? left : intake->linger_us / 1e6))
                return 0;
        }
        ssize_t got = read(intake->group_fd, intake->buffer, intake->buffer_size);
        if (got < 0) {
            if (errno == EINTR)
                continue;
            if (errno != EAGAIN) {
                intake->error = -errno;
                return intake->error;
            }
            drained = 1;
            continue;
        }
        drained = (size_t)got <= intake->buffer_size / 2;
        double received = monotonic_seconds();
        struct afsd_event *read_now = intake->events + intake->events_count;
        int32_t error = 0;
        int parsed = afsd_parse_events(intake->buffer, (size_t)got, read_now,
                                       intake->events_capacity - intake->events_count, &error);
        size_t kept = 0;
        for (int i = 0; i < parsed; i++) {
            struct afsd_present *present = &intake->presents[intake->presents_count];
            if (answer_if_present(intake, &read_now[i], present)) {
                present->received = received;
                present->answered = monotonic_seconds();
                intake->presents_count++;
            } else {
                read_now[kept++] = read_now[i];
            }
        }
        intake->events_count += kept;
        if (error) {
            intake->error = error;
            return error;
        }
        if (kept) {             /* a miss (or worse) waits for the caller: return now */
            intake->more = (size_t)got > intake->buffer_size / 2;
            return 0;
        }
    }
}
