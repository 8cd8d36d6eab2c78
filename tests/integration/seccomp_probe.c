/* Tries one system call named on the command line and prints "<name> ok" or
 * "<name> <errno name>": what a seccomp profile lets through is seen from inside a
 * container without a tool for each call. Built static by the tests (gcc -static). */
#define _GNU_SOURCE
#include <errno.h>
#include <linux/sched.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/personality.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <sys/wait.h>
#include <unistd.h>

static long child_result(long pid) {
    if (pid == 0)
        _exit(0);
    if (pid > 0)
        waitpid((pid_t)pid, NULL, 0);
    return pid < 0 ? -1 : 0;
}

static long try_call(const char *name) {
    char buf[8] = "abcdefg", out[8];
    if (!strcmp(name, "unshare_user"))
        return syscall(SYS_unshare, CLONE_NEWUSER);
    if (!strcmp(name, "keyctl")) /* KEYCTL_GET_KEYRING_ID of the session keyring */
        return syscall(SYS_keyctl, 0, -3, 0);
    if (!strcmp(name, "add_key"))
        return syscall(SYS_add_key, "user", "probe", "v", 1, -2);
    if (!strcmp(name, "process_vm_readv")) {
        struct iovec local = {out, sizeof out}, remote = {buf, sizeof buf};
        return syscall(SYS_process_vm_readv, getpid(), &local, 1, &remote, 1, 0);
    }
    if (!strcmp(name, "kcmp")) /* KCMP_FILE of fd 0 with itself */
        return syscall(SYS_kcmp, getpid(), getpid(), 0, 0, 0);
    if (!strcmp(name, "clone_newns"))
        return child_result(syscall(SYS_clone, CLONE_NEWNS | SIGCHLD, 0, 0, 0, 0));
    if (!strcmp(name, "fork"))
        return child_result(syscall(SYS_clone, SIGCHLD, 0, 0, 0, 0));
    if (!strcmp(name, "clone3")) {
        struct clone_args args;
        memset(&args, 0, sizeof args);
        args.exit_signal = SIGCHLD;
        return child_result(syscall(SYS_clone3, &args, sizeof args));
    }
    if (!strcmp(name, "personality_query"))
        return syscall(SYS_personality, 0xffffffffUL) < 0 ? -1 : 0;
    if (!strcmp(name, "personality_addr_no_randomize"))
        return syscall(SYS_personality, ADDR_NO_RANDOMIZE) < 0 ? -1 : 0;
    errno = EINVAL;
    return -2;
}

int main(int argc, char **argv) {
    for (int i = 1; i < argc; i++) {
        errno = 0;
        long rc = try_call(argv[i]);
        if (rc == -2) {
            printf("%s unknown-probe\n", argv[i]);
        } else if (rc < 0) {
            const char *e = errno == EPERM ? "EPERM" : errno == ENOSYS ? "ENOSYS"
                          : errno == EINVAL ? "EINVAL" : errno == EACCES ? "EACCES" : NULL;
            if (e)
                printf("%s %s\n", argv[i], e);
            else
                printf("%s errno%d\n", argv[i], errno);
        } else {
            printf("%s ok\n", argv[i]);
        }
    }
    return 0;
}
