/*
 * C helpers for afsd's cachefiles on-demand daemon (afsd/ondemand/cachefiles/), compiled by cffi in API mode
 * when the package is installed (c_ext/build_cachefiles.py). They exist because Python alone gets these
 * wrong or slow: fcntl.ioctl overflows for message ids >= 2^31, bytes objects are not page-aligned (direct
 * I/O wants that), and a pwrite of megabytes should run without the GIL (cffi releases it around every call).
 * The wire layouts come from the kernel's own <linux/cachefiles.h>.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <unistd.h>
#include <linux/cachefiles.h>

#include "afsd_cachefiles.h"

#define AFSD_PAGE 4096u
#define AFSD_PIECE (4u << 20)  /* bytes per pwrite: bounded so a huge range does not need a huge buffer */

int afsd_parse_request(const uint8_t *buffer, size_t size, struct afsd_request *request)
{
    const struct cachefiles_msg *msg = (const struct cachefiles_msg *)buffer;

    memset(request, 0, sizeof(*request));
    request->anon_fd = -1;
    if (size < sizeof(*msg) || msg->len < sizeof(*msg) || msg->len > size)
        return -EBADMSG;
    request->msg_id = msg->msg_id;
    request->opcode = msg->opcode;
    request->length = msg->len;
    request->object_id = msg->object_id;
    if (msg->opcode == CACHEFILES_OP_OPEN) {
        const struct cachefiles_open *open = (const struct cachefiles_open *)msg->data;
        size_t keys = msg->len - sizeof(*msg);
        if (keys < sizeof(*open))
            return -EBADMSG;
        request->anon_fd = (int32_t)open->fd;
        keys -= sizeof(*open);
        if ((size_t)open->volume_key_size + open->cookie_key_size > keys)
            return -EBADMSG;
        request->volume_key_offset = (uint32_t)(open->data - buffer);
        request->volume_key_size = open->volume_key_size;
        /* The volume key is a C string whose size counts its NUL. */
        while (request->volume_key_size > 0 && open->data[request->volume_key_size - 1] == '\0')
            request->volume_key_size--;
        request->cookie_key_offset = request->volume_key_offset + open->volume_key_size;
        request->cookie_key_size = open->cookie_key_size;
    } else if (msg->opcode == CACHEFILES_OP_READ) {
        const struct cachefiles_read *read = (const struct cachefiles_read *)msg->data;
        if (msg->len - sizeof(*msg) < sizeof(*read))
            return -EBADMSG;
        request->offset = read->off;
        request->count = read->len;
    }
    return 0;
}

/*
 * A malformed OPEN still installed an anon fd in our fd table and holds a mount waiting for its copen: close
 * the fd (nothing else knows its number) and fail the OPEN. Only an OPEN whose header is whole is answered
 * (its id is then the kernel's); a message too short to say its fd cannot be helped.
 */
static void fail_malformed_open(int device_fd, struct afsd_request *request, int header_whole)
{
    char command[48];
    int length;

    if (request->opcode != CACHEFILES_OP_OPEN || !header_whole)
        return;
    if (request->anon_fd >= 0) {
        close(request->anon_fd);
        request->anon_fd = -1;
    }
    length = snprintf(command, sizeof(command), "copen %u,%d", request->msg_id, -EBADMSG);
    while (write(device_fd, command, (size_t)length) < 0 && errno == EINTR)
        ;
}

ssize_t afsd_read_request(int device_fd, uint8_t *buffer, size_t size, struct afsd_request *request)
{
    ssize_t got;
    int parsed;

    do {
        got = read(device_fd, buffer, size);
    } while (got < 0 && errno == EINTR);
    if (got < 0)
        return -errno;
    if (got == 0)
        return 0;
    parsed = afsd_parse_request(buffer, (size_t)got, request);
    if (request->opcode == CACHEFILES_OP_OPEN && request->anon_fd >= 0)
        /* Anon fds are not close-on-exec; nothing we start may inherit one (it would pin the cache). */
        fcntl(request->anon_fd, F_SETFD, FD_CLOEXEC);
    if (parsed < 0) {
        /* (afsd_parse_request fills msg_id and opcode only once the header is whole) */
        fail_malformed_open(device_fd, request, request->length != 0);
        return parsed;
    }
    return got;
}

int afsd_read_complete(int anon_fd, unsigned long msg_id)
{
    if (ioctl(anon_fd, CACHEFILES_IOC_READ_COMPLETE, msg_id) < 0)
        return -errno;
    return 0;
}

static __thread uint8_t *piece_buffer;

size_t afsd_write_piece_size(void)
{
    return AFSD_PIECE;
}

ssize_t afsd_pwrite_aligned(int fd, const uint8_t *data, size_t size, uint64_t offset)
{
    size_t done = 0;

    if (offset % AFSD_PAGE)
        return -EINVAL;
    if (piece_buffer == NULL && posix_memalign((void **)&piece_buffer, AFSD_PAGE, AFSD_PIECE) != 0) {
        piece_buffer = NULL;
        return -ENOMEM;
    }
    while (done < size) {
        size_t piece = size - done < AFSD_PIECE ? size - done : AFSD_PIECE;
        size_t padded = (piece + AFSD_PAGE - 1) / AFSD_PAGE * AFSD_PAGE;
        size_t written = 0;

        memcpy(piece_buffer, data + done, piece);
        memset(piece_buffer + piece, 0, padded - piece);
        while (written < padded) {
            ssize_t n = pwrite(fd, piece_buffer + written, padded - written, (off_t)(offset + done + written));
            if (n < 0 && errno == EINTR)
                continue;
            if (n < 0)
                return -errno;
            if (n == 0)
                return -EIO;
            written += (size_t)n;
        }
        done += piece;
    }
    return (ssize_t)done;
}
