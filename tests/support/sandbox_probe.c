/* What a container may do, tried for real: one line per probe, "NAME: ok ..." or "NAME: errno ERRNO".
   Built statically by tests/support/sandbox.py and uploaded into containers as an extra file. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/ptrace.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

static void report(const char *name, int result, const char *detail) {
    if (result < 0) printf("%s: errno %d %s\n", name, errno, strerror(errno));
    else printf("%s: ok %s\n", name, detail);
}

int main(int argc, char **argv) {
    const char *what = argc > 1 ? argv[1] : "all";
    if (!strcmp(what, "id")) {
        printf("id: uid=%d euid=%d gid=%d egid=%d\n", getuid(), geteuid(), getgid(), getegid());
        return 0;
    }
    report("raw_socket", socket(AF_INET, SOCK_RAW, IPPROTO_ICMP), "");
    report("unshare_user", unshare(CLONE_NEWUSER), "");
    report("unshare_mount", unshare(CLONE_NEWNS), "");
    mkdir("/tmp/probe-mnt", 0755);
    report("mount", mount("none", "/tmp/probe-mnt", "tmpfs", 0, NULL), "");
    report("init_module", (int)syscall(SYS_init_module, "", 0UL, ""), "");
    int devnull = open("/dev/null", O_RDONLY);
    report("finit_module", (int)syscall(SYS_finit_module, devnull, "", 0), "");
    pid_t child = fork();
    if (child == 0) { pause(); _exit(0); }
    report("ptrace_attach", (int)ptrace(PTRACE_ATTACH, child, NULL, NULL), "");
    kill(child, SIGKILL);
    waitpid(child, NULL, 0);
    char buffer[64];
    int fd = open("/proc/kcore", O_RDONLY);
    if (fd < 0) report("kcore", -1, "");
    else {
        ssize_t n = read(fd, buffer, sizeof buffer);
        char detail[64];
        snprintf(detail, sizeof detail, "read %zd bytes", n);
        report("kcore", n < 0 ? -1 : 0, detail);
    }
    return 0;
}
