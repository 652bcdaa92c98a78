/*
 * runnel-init: PID 1 of every job container.
 *
 * Steps are exec'd into the container, so they are not this process's
 * children, but anything they leave behind (daemons, orphans) is re-parented
 * here and must be reaped. On SIGTERM/SIGINT/SIGHUP the signal is passed to
 * every other process of the container (kill(-1) inside a PID namespace stays
 * inside it) and init exits once none is left, which lets steps shut down
 * within the grace period. When init exits the kernel kills whatever remains.
 *
 * Static and libc-only so it runs in any image, whatever its libc.
 */
#include <errno.h>
#include <signal.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static int others_alive(void) {
    /* kill(-1, 0) succeeds while any process other than us can be signalled. */
    return kill(-1, 0) == 0 || errno != ESRCH;
}

int main(void) {
    sigset_t all;
    sigfillset(&all);
    sigprocmask(SIG_BLOCK, &all, NULL);
    int stopping = 0;
    for (;;) {
        siginfo_t info;
        int sig;
        if (stopping) {
            struct timespec tick = {0, 20 * 1000 * 1000};
            sig = sigtimedwait(&all, &info, &tick);
        } else {
            sig = sigwaitinfo(&all, &info);
        }
        while (waitpid(-1, NULL, WNOHANG) > 0) {
        }
        if (sig == SIGTERM || sig == SIGINT || sig == SIGHUP) {
            stopping = 1;
            kill(-1, sig);
        }
        if (stopping && !others_alive()) {
            return 0;
        }
    }
}
