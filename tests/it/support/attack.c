/*
 * attack: what a hostile job step tries, one attempt per run, built
 * statically at test time (tests/sandbox.rs) so that it runs in any image.
 *
 *   attack NAME [ARG...]
 *
 * prints one line, "NAME: ok" when the kernel let it happen or
 * "NAME: ERRNO" (e.g. "unshare-user: EPERM") when it refused, and exits 0
 * either way: the test reads the line.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/keyctl.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/personality.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/sysmacros.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static int report(const char *name, long r) {
    if (r < 0) {
        const char *e = strerrorname_np(errno);
        printf("%s: %s\n", name, e ? e : "E?");
    } else {
        printf("%s: ok\n", name);
    }
    return 0;
}

/* A clone-like call: if it made a child, the child leaves at once. */
static long reap(long r) {
    if (r == 0) _exit(0);
    if (r > 0) waitpid((pid_t)r, NULL, __WALL);
    return r;
}

static void *thread_main(void *arg) { return arg; }

static int usage(void) {
    fprintf(stderr, "usage: attack NAME [ARG...]\n");
    return 2;
}

int main(int argc, char **argv) {
    if (argc < 2) return usage();
    const char *n = argv[1];
    const char *a = argc > 2 ? argv[2] : "";
    const char *b = argc > 3 ? argv[3] : "";

    if (!strcmp(n, "unshare-user")) return report(n, unshare(CLONE_NEWUSER));
    if (!strcmp(n, "unshare-mount")) return report(n, unshare(CLONE_NEWNS));
    if (!strcmp(n, "clone-user"))
        return report(n, reap(syscall(SYS_clone, CLONE_NEWUSER | SIGCHLD, 0, 0, 0, 0)));
    if (!strcmp(n, "clone3")) {
        uint64_t args[11] = {0};
        args[4] = SIGCHLD; /* exit_signal */
        return report(n, reap(syscall(SYS_clone3, args, sizeof args)));
    }
    if (!strcmp(n, "setns")) {
        int fd = open("/proc/1/ns/mnt", O_RDONLY);
        if (fd < 0) return report(n, fd);
        return report(n, setns(fd, 0));
    }
    if (!strcmp(n, "mount")) return report(n, mount("none", "/tmp", "tmpfs", 0, NULL));
    if (!strcmp(n, "keyring"))
        return report(n, syscall(SYS_keyctl, KEYCTL_GET_KEYRING_ID, KEY_SPEC_SESSION_KEYRING, 0));
    if (!strcmp(n, "add-key"))
        return report(n, syscall(SYS_add_key, "user", a, "job-secret", 10, KEY_SPEC_USER_KEYRING));
    if (!strcmp(n, "read-key")) {
        long id = syscall(SYS_keyctl, KEYCTL_SEARCH, KEY_SPEC_USER_KEYRING, "user", a, 0);
        if (id < 0) return report(n, id);
        char buf[256] = {0};
        long r = syscall(SYS_keyctl, KEYCTL_READ, id, buf, sizeof buf - 1);
        if (r >= 0) printf("read: %s\n", buf);
        return report(n, r);
    }
    if (!strcmp(n, "bpf")) {
        char attr[128] = {0};
        return report(n, syscall(SYS_bpf, 0 /* BPF_MAP_CREATE */, attr, sizeof attr));
    }
    if (!strcmp(n, "perf")) {
        char attr[128] = {0};
        return report(n, syscall(SYS_perf_event_open, attr, 0, -1, -1, 0));
    }
    if (!strcmp(n, "userfaultfd")) return report(n, syscall(SYS_userfaultfd, 0));
    if (!strcmp(n, "io-uring")) {
        char params[120] = {0};
        return report(n, syscall(SYS_io_uring_setup, 1, params));
    }
    if (!strcmp(n, "personality")) return report(n, personality(READ_IMPLIES_EXEC));
    if (!strcmp(n, "thread")) {
        pthread_t t;
        int e = pthread_create(&t, NULL, thread_main, NULL);
        if (e == 0) e = pthread_join(t, NULL);
        errno = e;
        return report(n, e ? -1 : 0);
    }
    if (!strcmp(n, "write")) { /* write PATH VALUE */
        int fd = open(a, O_WRONLY);
        if (fd < 0) return report(n, fd);
        return report(n, write(fd, b, strlen(b)));
    }
    if (!strcmp(n, "mkdir")) return report(n, mkdir(a, 0755));
    if (!strcmp(n, "mknod-block")) /* a loop device */
        return report(n, mknod(a, S_IFBLK | 0600, makedev(7, 0)));
    if (!strcmp(n, "mknod-kvm")) return report(n, mknod(a, S_IFCHR | 0600, makedev(10, 232)));
    if (!strcmp(n, "open-rw")) return report(n, open(a, O_RDWR));
    if (!strcmp(n, "open-w")) return report(n, open(a, O_WRONLY));
    if (!strcmp(n, "open-r")) return report(n, open(a, O_RDONLY));
    if (!strcmp(n, "kill")) return report(n, kill((pid_t)atoi(a), SIGKILL)); /* kill PID */
    if (!strcmp(n, "wait-for")) { /* wait-for PATH: up to a minute */
        struct timespec tick = {0, 10 * 1000 * 1000};
        for (int i = 0; i < 6000; i++) {
            if (access(a, F_OK) == 0) return report(n, 0);
            nanosleep(&tick, NULL);
        }
        errno = ETIMEDOUT;
        return report(n, -1);
    }
    return usage();
}
