"""What a container can reach of the host while ``ctr`` starts processes in it (issue 8.2).

Every process that enters a container is a fork of berth's shim (a Python process holding
the shim's ttrpc sockets, other processes' stdio FIFOs, exec.fifo...) until it execs the
container's command. A container watching ``/proc`` must not be able to read such a
process's fds, take them with ``pidfd_getfd``, or name the host's Python interpreter
through ``/proc/self/exe`` (a ``#!/proc/self/exe`` script: the CVE-2019-5736 class).

The probes run in the container from a bind-mounted folder: a busybox shell loop that,
for every process outside its own session (the processes ``ctr`` starts: their set-up
helpers and their commands), reads the links of ``/proc/<pid>/fd`` (the numbers can be
listed with CAP_DAC_OVERRIDE alone; what they point to needs ptrace access, which only
a dumpable process grants), reads ``/proc/<pid>/exe`` and runs
``steal`` (a static C program built here with gcc) which tries ``pidfd_getfd`` on each of
its fds above 2. A process whose fds can be read is dumpable; a set-up helper must not
be, and a command of the container has nothing above fd 2. Each check runs with berth's
in-process runtime and with runc driven by berth's shim.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.images import NAME
from tests.interop.test_ctr_berth_runtime import (
    GUARD,
    Berth,
    berth as berth,  # noqa: F401
    wait_for,
)

pytestmark = [pytest.mark.interop, pytest.mark.root]

RUNTIME = "io.containerd.berth.v1"
EXECS = 40
O_CLOEXEC = 0o2000000

STEAL_C = r"""
#define _GNU_SOURCE
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

/* steal PID: take every fd above 2 of PID with pidfd_getfd and say what it was (its
   path, then ctrroot for this container's own root directory, dir, file or other). */
int main(int argc, char **argv) {
    if (argc != 2) return 2;
    int pid = atoi(argv[1]);
    struct stat root;
    if (stat("/", &root)) return 2;
    int pidfd = syscall(434 /* pidfd_open */, pid, 0);
    if (pidfd < 0) return 0;
    for (int fd = 3; fd < 1024; fd++) {
        int got = syscall(438 /* pidfd_getfd */, pidfd, fd, 0);
        if (got < 0) {
            if (errno == EPERM) { printf("DENIED %d\n", pid); break; }
            continue;
        }
        char path[64], target[512];
        struct stat st;
        snprintf(path, sizeof path, "/proc/self/fd/%d", got);
        ssize_t n = readlink(path, target, sizeof target - 1);
        target[n > 0 ? n : 0] = 0;
        const char *kind = fstat(got, &st) ? "other"
            : S_ISDIR(st.st_mode) ? (st.st_dev == root.st_dev && st.st_ino == root.st_ino
                                     ? "ctrroot" : "dir")
            : S_ISREG(st.st_mode) ? "file" : "other";
        printf("STOLE %d %d %s %s\n", pid, fd, target, kind);
        close(got);
    }
    return 0;
}
"""

# pid 1 of the container (session 1): every process of another session is one ctr made.
WATCH_SH = r"""#!/bin/sh
out=/probe/found
root=$(stat -c %d:%i /)
: > $out
: > /probe/seen
while [ ! -e /probe/stop ]; do
  for d in /proc/[0-9]*; do
    p=${d#/proc/}
    read -r line < $d/stat 2>/dev/null || continue
    set -- ${line##*) }
    [ "$4" = 1 ] && continue
    echo "$p" >> /probe/seen
    for f in $d/fd/*; do
      [ -L "$f" ] || continue
      n=${f##*/}
      # Listing fd numbers needs only CAP_DAC_OVERRIDE; reading one needs ptrace access.
      t=$(readlink $f 2>/dev/null)
      k=other; [ -d "$f" ] && k=dir; [ -f "$f" ] && k=file
      [ $k = dir ] && [ "$(stat -L -c %d:%i $f 2>/dev/null)" = "$root" ] && k=ctrroot
      [ "$n" -ge 3 ] && [ -n "$t" ] && echo "FD $p $n $t $k" >> $out
    done
    t=$(readlink $d/exe 2>/dev/null)
    case "$t" in
      ""|/bin/busybox|"/memfd:berth-exec (deleted)") ;;
      *) echo "EXE $p $t" >> $out ;;
    esac
    /probe/steal $p >> $out
  done
  echo scan >> /probe/scans
done
echo done > /probe/done
"""

# Run by the host's Python, it would say so (and could reach its binary again).
SELF_EXE = "#!/proc/self/exe\nimport sys\nprint('HOST-PYTHON-RAN', sys.executable)\n"


def python_mounts() -> tuple[str, ...]:
    """Read-only binds that let the host's Python run in a busybox container (its loader,
    libraries and standard library at their host paths): an image made for the attack
    would bring them, and without them the interpreter would fail before it could say
    it ran. /lib and /lib64 are symlinks on Debian 12 (``usr/lib``): bind sources are
    resolved on the host, as runc does."""
    out: list[str] = []
    for path in ("/lib", "/lib64", "/usr/lib", os.path.realpath(sys.base_prefix)):
        if os.path.exists(path):
            out += ["--mount", f"type=bind,src={path},dst={path},options=rbind:ro"]
    return tuple(out)


def sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def host_binaries() -> dict[str, str]:
    """The binaries a container would overwrite through /proc/self/exe: the shim's
    Python (this virtualenv's interpreter) and runc."""
    paths = {os.path.realpath(sys.executable), os.path.realpath(shutil.which("runc") or "")}
    return {p: sha256(p) for p in paths if os.path.isfile(p)}


@pytest.fixture
def probe(berth: Berth) -> Path:
    """The folder bind-mounted at /probe: the static ``steal``, the loop, the script."""
    assert shutil.which("gcc"), "gcc is needed to build the static probe (tests/setup-host.sh)"
    d = berth.base / "probe"
    d.mkdir()
    (d / "steal.c").write_text(STEAL_C)
    r = subprocess.run(["gcc", "-static", "-O1", "-o", str(d / "steal"), str(d / "steal.c")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    for name, text in (("watch.sh", WATCH_SH), ("selfexe", SELF_EXE)):
        (d / name).write_text(text)
        (d / name).chmod(0o755)
    return d


def runtime_args(berth: Berth, oci: str) -> tuple[str, ...]:
    """``ctr run`` options that select berth's shim with ``oci`` as its OCI runtime."""
    if oci in ("berth", "runc-v2"):
        return ()
    return ("--runtime-config-path", str(berth.runtime_config(oci)))


def start_watch(berth: Berth, probe: Path, cid: str, oci: str) -> int:
    mount = f"type=bind,src={probe},dst=/probe,options=rbind:rw"
    runtime = "io.containerd.runc.v2" if oci == "runc-v2" else RUNTIME
    berth.ok("run", "-d", "--runtime", runtime, *runtime_args(berth, oci), "--mount", mount,
             *python_mounts(), NAME, cid, "sh", "/probe/watch.sh")
    wait_for("the watch loop's first scan", lambda: (probe / "scans").exists()
             and (probe / "scans").read_text())
    return berth.tasks()[cid][0]


def stop_watch(berth: Berth, probe: Path, cid: str) -> list[str]:
    """Stop the loop and return what it found (read after it has finished)."""
    (probe / "stop").touch()
    wait_for("the watch loop to finish", lambda: (probe / "done").exists())
    deadline = time.monotonic() + GUARD
    while berth.tasks().get(cid, (0, "STOPPED"))[1] != "STOPPED":
        assert time.monotonic() < deadline, "the watch task did not stop"
        time.sleep(0.05)
    berth.ok("tasks", "rm", cid)
    berth.ok("containers", "rm", cid)
    return [line for line in (probe / "found").read_text().splitlines()
            if not line.startswith("DENIED ")]


RUNC_INIT_OWN_FILES = ("anon_inode:[eventpoll]", "/proc/sys/kernel/cap_last_cap",
                       "/sys/kernel/mm/transparent_hugepage/hpage_pmd_size")


def runc_own(found: list[str]) -> list[str]:
    """What runc 1.1's own ``runc init`` shows for a moment, under containerd's runc
    shim as under berth's: it runs dumpable from its read-only clone of itself (a bind
    mount already detached, so its exe reads "/") with nothing but the Go runtime's
    epoll and self-pipe (both ends of one pipe in one process), and, caught under load,
    the reads of kernel files every container can read for itself that Go makes at start:
    /proc/sys/kernel/cap_last_cap (its capability package) and the huge page size under
    /sys/kernel/mm/transparent_hugepage (its runtime; caught in a CI run of 2026-12-06).
    None of it reaches the shim or the host; anything else found is kept."""
    pipes: dict[tuple[str, str], set[str]] = {}
    epolls: dict[str, set[int]] = {}
    for line in found:
        kind, pid, *rest = line.split(" ")
        if kind in ("FD", "STOLE") and rest[1].startswith("pipe:"):
            pipes.setdefault((pid, rest[1]), set()).add(rest[0])
        if kind in ("FD", "STOLE") and rest[1] == "anon_inode:[eventpoll]":
            epolls.setdefault(pid, set()).add(int(rest[0]))

    def go_netpoll_pipe(pid: str, fd: str, what: str) -> bool:
        # Go's netpoller makes its epoll fd, then its wake-up pipe's two ends right after
        # it: the probe, racing the process, may catch only one end of that pipe.
        return what.startswith("pipe:") and bool(
            {int(fd) - 1, int(fd) - 2} & epolls.get(pid, set()))

    def loader_library(pid: str, what: str) -> bool:
        # runc is linked dynamically: ld.so opens libc (and its other libraries) for a
        # moment while runc init starts, before anything of the container exists.
        library = re.fullmatch(r"/(usr/)?lib/[\w./-]+\.so(\.[\d.]+)?", what)
        return pid in inits and library is not None

    def own_root(pid: str, what: str, kind: str) -> bool:
        # Two things read "/" in a runc init, both its own: the read-only bind of runc's
        # binary it re-executes itself from (runc 1.1's cloned binary, a detached mount
        # like its exe; a file), and the container's root directory, which an exec's
        # init opens once it has joined the container (the same directory as the probe's
        # own "/"; seen with strace). The first was caught in a CI run of 2026-12-06.
        # The host's root directory would read "/" too: a directory that is not the
        # container's, never tolerated.
        return pid in inits and what == "/" and kind in ("file", "ctrroot")

    inits = {line.split(" ")[1] for line in found if line.split(" ")[0] == "EXE"
             and line.split(" ")[2:] == ["/"]}
    own = []
    for line in found:
        kind, pid, *rest = line.split(" ")
        if kind in ("FD", "STOLE") and (loader_library(pid, rest[1])
                                        or own_root(pid, rest[1], rest[-1])):
            own.append(line)
        elif kind == "EXE" and rest == ["/"]:
            own.append(line)
        elif kind in ("FD", "STOLE") and (rest[1] in RUNC_INIT_OWN_FILES or
                                         len(pipes.get((pid, rest[1]), ())) == 2 or
                                         go_netpoll_pipe(pid, rest[0], rest[1])):
            own.append(line)
    return own


def assert_nothing_found(oci: str, probe: Path, found: list[str]) -> None:
    seen = len(set((probe / "seen").read_text().split()))
    tolerated = runc_own(found) if oci != "berth" else []
    print(f"{oci}: the loop saw {seen} processes of ctr; found {len(found)} "
          f"({len(tolerated)} of them runc init's own)")
    assert [line for line in found if line not in tolerated] == [], found
    assert seen > 0, "the loop saw no process of ctr"


def assert_all_cloexec(pid: int) -> None:
    """Every fd of the shim above stdio is close-on-exec: nothing of it reaches runc,
    hooks or a container command by inheritance."""
    leaks = []
    for name in os.listdir(f"/proc/{pid}/fdinfo"):
        if int(name) < 3:
            continue
        try:
            text = Path(f"/proc/{pid}/fdinfo/{name}").read_text()
            target = os.readlink(f"/proc/{pid}/fd/{name}")
        except FileNotFoundError:
            continue  # closed meanwhile
        flags = int(next(line.split()[1] for line in text.splitlines()
                         if line.startswith("flags:")), 8)
        if not flags & O_CLOEXEC:
            leaks.append((name, target))
    assert leaks == [], leaks


@pytest.mark.parametrize("oci", ["berth", "runc", "runc-v2"])
def test_exec_helpers_hold_nothing_a_container_can_take(berth: Berth, probe: Path,
                                                        oci: str) -> None:
    before = host_binaries()
    cid = berth.id("watch")
    task = start_watch(berth, probe, cid, oci)
    if oci != "runc-v2":
        assert_all_cloexec(berth.shim_of(task))
    for i in range(EXECS):
        r = berth.ctr("tasks", "exec", "--exec-id", f"e{i}", cid, "true")
        assert (r.rc, r.err) == (0, ""), r
    # A #!/proc/self/exe script and /proc/self/exe itself, exec'ed into the container
    # (the watch container has the host's Python libraries bound in: see python_mounts).
    for i, command in enumerate(("/probe/selfexe", "/proc/self/exe")):
        r = berth.ctr("tasks", "exec", "--exec-id", f"s{i}", cid, command)
        assert "HOST-PYTHON-RAN" not in r.out + r.err and "Python" not in r.err, r
        if oci == "berth":
            # The exec stub refuses to be an interpreter: nothing runs.
            assert (r.rc, r.out, r.err) == (127, "", ""), r
    if oci != "runc-v2":
        assert_all_cloexec(berth.shim_of(task))
    assert_nothing_found(oci, probe, stop_watch(berth, probe, cid))
    assert host_binaries() == before


@pytest.mark.parametrize("oci", ["berth", "runc"])
def test_init_helpers_hold_nothing_a_container_can_take(berth: Berth, probe: Path,
                                                        oci: str) -> None:
    """Containers started into the watching container's pid namespace (``--with-ns``):
    their whole set-up (mounts, pivot_root, capabilities) happens in its view."""
    before = host_binaries()
    watcher = berth.id("watch")
    task = start_watch(berth, probe, watcher, oci)
    mount = f"type=bind,src={probe},dst=/probe,options=rbind:ro"
    joined = ("--with-ns", f"pid:/proc/{task}/ns/pid", "--mount", mount, *python_mounts(),
              *runtime_args(berth, oci))
    for i in range(10):
        r = berth.run(berth.id(f"i{i}"), "true", extra=joined)
        assert (r.rc, r.err) == (0, ""), r
    # The init itself is a #!/proc/self/exe script, then /proc/self/exe.
    for i, command in enumerate(("/probe/selfexe", "/proc/self/exe")):
        r = berth.run(berth.id(f"x{i}"), command, extra=joined)
        assert "HOST-PYTHON-RAN" not in r.out + r.err and "Python" not in r.err, r
        if oci == "berth":
            assert (r.rc, r.out, r.err) == (127, "", ""), r
    assert_nothing_found(oci, probe, stop_watch(berth, probe, watcher))
    assert host_binaries() == before
