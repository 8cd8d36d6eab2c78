"""RuntimeDefault: containerd's default seccomp profile, as berth builds it.

The facts are containerd 1.6's (contrib/seccomp): an allow list with EPERM for anything
else; per-architecture extras and the seccomp architectures of the host; ``personality``
only with the personas a normal program asks for; ``ptrace`` from kernel 4.8 on (when
its seccomp interaction was fixed); syscalls that need a capability allowed only when
the container's bounding set has it; and without CAP_SYS_ADMIN, ``clone`` only without
namespace flags and ``clone3`` failing with ENOSYS (its flags live in memory seccomp
cannot read, and ENOSYS makes C libraries fall back to ``clone``).

Selection follows containerd: the profile is computed after the capabilities are, from
``process.capabilities.bounding``. The result is plain OCI ``linux.seccomp`` JSON that
runc, crun and berth's in-process runtime load as it is.
"""

from __future__ import annotations

import errno
import os
import platform
from typing import Any

# Everything a container may call whatever its capabilities (names of every
# architecture: a name the host's architecture lacks is skipped by the runtime).
ALLOWED = """
    _llseek _newselect accept accept4 access adjtimex alarm bind brk capget capset
    chdir chmod chown chown32 clock_adjtime clock_adjtime64 clock_getres
    clock_getres_time64 clock_gettime clock_gettime64 clock_nanosleep
    clock_nanosleep_time64 close close_range connect copy_file_range creat dup dup2
    dup3 epoll_create epoll_create1 epoll_ctl epoll_ctl_old epoll_pwait epoll_pwait2
    epoll_wait epoll_wait_old eventfd eventfd2 execve execveat exit exit_group
    faccessat faccessat2 fadvise64 fadvise64_64 fallocate fanotify_mark fchdir
    fchmod fchmodat fchown fchown32 fchownat fcntl fcntl64 fdatasync fgetxattr
    flistxattr flock fork fremovexattr fsetxattr fstat fstat64 fstatat64 fstatfs
    fstatfs64 fsync ftruncate ftruncate64 futex futex_time64 futex_waitv futimesat
    get_robust_list get_thread_area getcpu getcwd getdents getdents64 getegid
    getegid32 geteuid geteuid32 getgid getgid32 getgroups getgroups32 getitimer
    getpeername getpgid getpgrp getpid getppid getpriority getrandom getresgid
    getresgid32 getresuid getresuid32 getrlimit getrusage getsid getsockname
    getsockopt gettid gettimeofday getuid getuid32 getxattr inotify_add_watch
    inotify_init inotify_init1 inotify_rm_watch io_cancel io_destroy io_getevents
    io_pgetevents io_pgetevents_time64 io_setup io_submit io_uring_enter
    io_uring_register io_uring_setup ioctl ioprio_get ioprio_set ipc kill
    landlock_add_rule landlock_create_ruleset landlock_restrict_self lchown lchown32
    lgetxattr link linkat listen listxattr llistxattr lremovexattr lseek lsetxattr
    lstat lstat64 madvise membarrier memfd_create memfd_secret mincore mkdir mkdirat
    mknod mknodat mlock mlock2 mlockall mmap mmap2 mprotect mq_getsetattr mq_notify
    mq_open mq_timedreceive mq_timedreceive_time64 mq_timedsend mq_timedsend_time64
    mq_unlink mremap msgctl msgget msgrcv msgsnd msync munlock munlockall munmap
    nanosleep newfstatat open openat openat2 pause pidfd_open pidfd_send_signal pipe
    pipe2 pkey_alloc pkey_free pkey_mprotect poll ppoll ppoll_time64 prctl pread64
    preadv preadv2 prlimit64 process_mrelease pselect6 pselect6_time64 pwrite64
    pwritev pwritev2 read readahead readlink readlinkat readv recv recvfrom recvmmsg
    recvmmsg_time64 recvmsg remap_file_pages removexattr rename renameat renameat2
    restart_syscall rmdir rseq rt_sigaction rt_sigpending rt_sigprocmask
    rt_sigqueueinfo rt_sigreturn rt_sigsuspend rt_sigtimedwait
    rt_sigtimedwait_time64 rt_tgsigqueueinfo sched_get_priority_max
    sched_get_priority_min sched_getaffinity sched_getattr sched_getparam
    sched_getscheduler sched_rr_get_interval sched_rr_get_interval_time64
    sched_setaffinity sched_setattr sched_setparam sched_setscheduler sched_yield
    seccomp select semctl semget semop semtimedop semtimedop_time64 send sendfile
    sendfile64 sendmmsg sendmsg sendto set_robust_list set_thread_area
    set_tid_address setfsgid setfsgid32 setfsuid setfsuid32 setgid setgid32
    setgroups setgroups32 setitimer setpgid setpriority setregid setregid32
    setresgid setresgid32 setresuid setresuid32 setreuid setreuid32 setrlimit setsid
    setsockopt setuid setuid32 setxattr shmat shmctl shmdt shmget shutdown
    sigaltstack signalfd signalfd4 sigprocmask sigreturn socket socketcall
    socketpair splice stat stat64 statfs statfs64 statx symlink symlinkat sync
    sync_file_range syncfs sysinfo tee tgkill time timer_create timer_delete
    timer_getoverrun timer_gettime timer_gettime64 timer_settime timer_settime64
    timerfd_create timerfd_gettime timerfd_gettime64 timerfd_settime
    timerfd_settime64 times tkill truncate truncate64 ugetrlimit umask uname unlink
    unlinkat utime utimensat utimensat_time64 utimes vfork vmsplice wait4 waitid
    waitpid write writev
""".split()

# Personas ``personality`` may set: PER_LINUX, PER_LINUX32, UNAME26, UNAME26|PER_LINUX32,
# and 0xffffffff (the query).
PERSONAS = (0x0, 0x8, 0x20000, 0x20008, 0xFFFFFFFF)

# GOARCH-style name: (seccomp architectures, syscalls only that architecture has).
ARCHES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "amd64": (("SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"),
              ("arch_prctl", "modify_ldt")),
    "386": ((), ("modify_ldt",)),
    "arm64": (("SCMP_ARCH_ARM", "SCMP_ARCH_AARCH64"), ("arm_fadvise64_64",
              "arm_sync_file_range", "sync_file_range2", "breakpoint", "cacheflush",
              "set_tls")),
    "arm": ((), ("arm_fadvise64_64", "arm_sync_file_range", "sync_file_range2",
                 "breakpoint", "cacheflush", "set_tls")),
    "ppc64le": ((), ("sync_file_range2", "swapcontext")),
    "s390x": (("SCMP_ARCH_S390", "SCMP_ARCH_S390X"), ("s390_pci_mmio_read",
              "s390_pci_mmio_write", "s390_runtime_instr")),
    "riscv64": (("SCMP_ARCH_RISCV64",), ("riscv_flush_icache",)),
}
_MACHINES = {"x86_64": "amd64", "i386": "386", "i686": "386", "aarch64": "arm64",
             "armv7l": "arm", "armv6l": "arm", "ppc64le": "ppc64le", "s390x": "s390x",
             "riscv64": "riscv64"}

# Capability: what it unlocks.
BY_CAPABILITY: dict[str, tuple[str, ...]] = {
    "CAP_DAC_READ_SEARCH": ("open_by_handle_at",),
    "CAP_SYS_ADMIN": (
        "bpf", "clone", "clone3", "fanotify_init", "fsconfig", "fsmount", "fsopen",
        "fspick", "lookup_dcookie", "mount", "mount_setattr", "move_mount",
        "name_to_handle_at", "open_tree", "perf_event_open", "quotactl", "quotactl_fd",
        "setdomainname", "sethostname", "setns", "syslog", "umount", "umount2",
        "unshare"),
    "CAP_SYS_BOOT": ("reboot",),
    "CAP_SYS_CHROOT": ("chroot",),
    "CAP_SYS_MODULE": ("delete_module", "init_module", "finit_module"),
    "CAP_SYS_PACCT": ("acct",),
    "CAP_SYS_PTRACE": ("kcmp", "pidfd_getfd", "process_madvise", "process_vm_readv",
                       "process_vm_writev", "ptrace"),
    "CAP_SYS_RAWIO": ("iopl", "ioperm"),
    "CAP_SYS_TIME": ("settimeofday", "stime", "clock_settime", "clock_settime64"),
    "CAP_SYS_TTY_CONFIG": ("vhangup",),
    "CAP_SYS_NICE": ("get_mempolicy", "mbind", "set_mempolicy"),
    "CAP_SYSLOG": ("syslog",),
    "CAP_BPF": ("bpf",),
    "CAP_PERFMON": ("perf_event_open",),
}

# CLONE_NEWNS|NEWUTS|NEWIPC|NEWUSER|NEWPID|NEWNET|NEWCGROUP: no new namespaces without
# CAP_SYS_ADMIN.
CLONE_NAMESPACE_FLAGS = 0x7E020000
ALLOW, ERRNO = "SCMP_ACT_ALLOW", "SCMP_ACT_ERRNO"


def goarch(machine: str | None = None) -> str:
    m = machine or platform.machine()
    return _MACHINES.get(m, m)


def kernel_at_least(major: int, minor: int, release: str | None = None) -> bool:
    parts = (release or os.uname().release).split(".", 2)
    try:
        have = (int(parts[0]), int("".join(c for c in parts[1] if c.isdigit()) or 0))
    except (IndexError, ValueError):
        return False
    return have >= (major, minor)


def _allow(names: tuple[str, ...] | list[str], args: list[dict[str, Any]] | None = None
           ) -> dict[str, Any]:
    entry: dict[str, Any] = {"names": list(names), "action": ALLOW}
    if args:
        entry["args"] = args
    return entry


def profile(bounding: list[str] | tuple[str, ...], *, arch: str | None = None,
            release: str | None = None) -> dict[str, Any]:
    """The RuntimeDefault profile for a container whose bounding set is ``bounding``."""
    arch = arch or goarch()
    arches, extra = ARCHES.get(arch, ((), ()))
    syscalls = [_allow(ALLOWED)]
    syscalls += [_allow(["personality"], [{"index": 0, "value": p, "op": "SCMP_CMP_EQ"}])
                 for p in PERSONAS]
    if kernel_at_least(4, 8, release):
        syscalls.append(_allow(["ptrace"]))
    if extra:
        syscalls.append(_allow(extra))
    for cap in bounding:
        if cap in BY_CAPABILITY:
            syscalls.append(_allow(BY_CAPABILITY[cap]))
    if "CAP_SYS_ADMIN" not in bounding:
        # s390's clone takes its flags second.
        index = 1 if arch == "s390x" else 0
        syscalls.append(_allow(["clone"], [{"index": index, "value": CLONE_NAMESPACE_FLAGS,
                                            "valueTwo": 0, "op": "SCMP_CMP_MASKED_EQ"}]))
        syscalls.append({"names": ["clone3"], "action": ERRNO, "errnoRet": errno.ENOSYS})
    return {"defaultAction": ERRNO, "architectures": list(arches), "syscalls": syscalls}
