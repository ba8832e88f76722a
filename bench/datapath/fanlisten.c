/* The baseline of the cold random-read row: a minimal fanotify pre-content listener in C.
 *
 *   fanlisten BLOB SOURCE
 *
 * Marks BLOB (a sparse erofs blob with its metadata present) for FAN_PRE_ACCESS, prints "ready" on
 * stdout, then answers every event by copying the asked range from SOURCE (the complete blob) into
 * BLOB through the event's own fd (writes through it raise no event) and allowing the access. No
 * hole checks, no verification, no other process: the least any listener can do per miss. Runs
 * until it is killed (the bench unmounts first, so no event is pending then).
 * Built by the bench itself: gcc -O2 -o fanlisten fanlisten.c
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/fanotify.h>
#include <unistd.h>

#ifndef FAN_CLASS_PRE_CONTENT
#define FAN_CLASS_PRE_CONTENT 0x00000008
#endif
#ifndef FAN_PRE_ACCESS
#define FAN_PRE_ACCESS 0x00100000
#endif
#define INFO_TYPE_RANGE 6 /* FAN_EVENT_INFO_TYPE_RANGE (Linux 6.14) */

struct range_info {       /* struct fanotify_event_info_range */
    uint8_t info_type;
    uint8_t pad;
    uint16_t len;
    uint32_t pad2;
    uint64_t offset;
    uint64_t count;
};

static void die(const char *what) {
    fprintf(stderr, "fanlisten: %s: %s\n", what, strerror(errno));
    exit(1);
}

static void fill(int source, int target, uint64_t offset, uint64_t count, char *buffer, size_t capacity) {
    while (count > 0) {
        size_t want = count < capacity ? count : capacity;
        ssize_t got = pread(source, buffer, want, (off_t)offset);
        if (got <= 0)
            return; /* past the end of the blob: nothing to copy */
        if (pwrite(target, buffer, (size_t)got, (off_t)offset) != got)
            die("pwrite");
        offset += (uint64_t)got;
        count -= (uint64_t)got;
    }
}

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: fanlisten BLOB SOURCE\n");
        return 2;
    }
    int source = open(argv[2], O_RDONLY | O_CLOEXEC);
    if (source < 0)
        die(argv[2]);
    int group = fanotify_init(FAN_CLASS_PRE_CONTENT | FAN_CLOEXEC, O_RDWR | O_LARGEFILE);
    if (group < 0)
        die("fanotify_init");
    if (fanotify_mark(group, FAN_MARK_ADD, FAN_PRE_ACCESS, AT_FDCWD, argv[1]) < 0)
        die("fanotify_mark");
    printf("ready\n");
    fflush(stdout);

    size_t capacity = 1 << 20;
    char *buffer = malloc(capacity);
    char events[64 * 1024] __attribute__((aligned(8)));
    for (;;) {
        ssize_t length = read(group, events, sizeof events);
        if (length < 0) {
            if (errno == EINTR)
                continue;
            die("read");
        }
        struct fanotify_event_metadata *event = (struct fanotify_event_metadata *)events;
        for (; FAN_EVENT_OK(event, length); event = FAN_EVENT_NEXT(event, length)) {
            if (event->fd < 0)
                continue;
            char *info = (char *)event + event->metadata_len;
            char *end = (char *)event + event->event_len;
            while (info + sizeof(struct range_info) <= end) {
                struct range_info *range = (struct range_info *)info;
                if (range->info_type == INFO_TYPE_RANGE)
                    fill(source, event->fd, range->offset, range->count, buffer, capacity);
                if (range->len == 0)
                    break;
                info += range->len;
            }
            struct fanotify_response answer = {.fd = event->fd, .response = FAN_ALLOW};
            if (write(group, &answer, sizeof answer) != sizeof answer)
                die("answer");
            close(event->fd);
        }
    }
}
