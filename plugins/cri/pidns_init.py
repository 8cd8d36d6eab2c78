"""PID 1 of a CRI pod's shared PID namespace (berth's stand-in for a pause container).

Run as ``python -I -S pidns_init.py FOLDER`` (no site, no berth import: it starts in a
few milliseconds and holds little memory). The first process unshares a new PID
namespace, forks its PID 1, writes that child's pid (as the parent namespace sees it)
on stdout, and waits for it; the child reaps every orphan of the pod (SIGCHLD ignored:
the kernel reaps for it) and sleeps. It dies with SIGKILL from berthd at
StopPodSandbox, and then the kernel kills every process left in the namespace. Killing
the waiting parent kills the child too (parent-death signal). ``FOLDER`` (the pod's
state folder) is only there so that berthd can tell its holders apart in /proc.
"""

import ctypes
import os
import signal
import sys

CLONE_NEWPID = 0x20000000
PR_SET_PDEATHSIG = 1


def _init() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    os.chdir("/")
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.close(null)
    # Ignored SIGCHLD: the kernel reaps children and re-parented orphans at once.
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)
    # Signals from inside the namespace to its PID 1 are dropped unless handled: the
    # pod's containers cannot end it; berthd (outside) still can.
    while True:
        signal.pause()


def main() -> int:
    if len(sys.argv) != 2:
        print("usage: pidns_init.py FOLDER", file=sys.stderr)
        return 2
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(CLONE_NEWPID) != 0:
        e = ctypes.get_errno()
        print(f"unshare(CLONE_NEWPID): {os.strerror(e)}", file=sys.stderr)
        return 1
    pid = os.fork()
    if pid == 0:
        try:
            _init()
        finally:
            os._exit(0)
    sys.stdout.write(f"{pid}\n")
    sys.stdout.flush()
    os.close(1)
    try:
        os.waitpid(pid, 0)
    except ChildProcessError:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
