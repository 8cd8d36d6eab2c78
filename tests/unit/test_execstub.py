"""The exec stub (``berth.plugins.runtimes.inprocess.execstub``): its machine code is what
its assembly source says, and, run from its sealed memfd, it execs only when asked by
the runtime and cannot be changed. The stub of the other machine runs under qemu-user.
No root needed."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from berth.plugins.runtimes.inprocess import execstub

MACHINES = {
    # machine: (assembler, objcopy, its source, its code, qemu-user binary)
    "x86_64": (["as", "--64"], "objcopy", execstub.SOURCE_X86_64, execstub.CODE_X86_64,
               "qemu-x86_64"),
    "aarch64": (["aarch64-linux-gnu-as"], "aarch64-linux-gnu-objcopy",
                execstub.SOURCE_AARCH64, execstub.CODE_AARCH64, "qemu-aarch64"),
}


@pytest.mark.parametrize("machine", sorted(MACHINES))
def test_code_is_the_assembled_source(tmp_path: Path, machine: str) -> None:
    assembler, objcopy, source, code, _ = MACHINES[machine]
    assert shutil.which(assembler[0]) and shutil.which(objcopy), \
        f"{assembler[0]} is needed (tests/setup-host.sh)"
    (tmp_path / "stub.S").write_text(source)
    subprocess.run([*assembler, "-o", str(tmp_path / "stub.o"), str(tmp_path / "stub.S")],
                   check=True)
    subprocess.run([objcopy, "-O", "binary", "-j", ".text", str(tmp_path / "stub.o"),
                    str(tmp_path / "stub.bin")], check=True)
    assert (tmp_path / "stub.bin").read_bytes() == code


def run_native(argv: list[str]) -> subprocess.CompletedProcess[bytes]:
    """Exec the sealed memfd with ``argv`` (from a Python child that inherits a copy)."""
    fd = execstub.open_sealed()
    assert fd >= 0, f"no exec stub for {platform.machine()}"
    try:
        code = ("import os, sys; os.execve(int(sys.argv[1]), sys.argv[2:], "
                "{'PATH': '/bin', 'MARK': 'env-kept'})")
        inherited = os.dup(fd)
        try:
            return subprocess.run([sys.executable, "-c", code, str(inherited), *argv],
                                  pass_fds=(inherited,), capture_output=True, timeout=30)
        finally:
            os.close(inherited)
    finally:
        os.close(fd)


def runner(machine: str, tmp_path: Path
           ) -> Callable[[list[str]], subprocess.CompletedProcess[bytes]]:
    if machine == platform.machine():
        return run_native
    qemu = MACHINES[machine][4]
    assert shutil.which(qemu), f"{qemu} is needed (qemu-user, tests/setup-host.sh)"
    path = tmp_path / f"stub-{machine}"
    path.write_bytes(execstub.elf(machine))
    path.chmod(0o555)

    def run(argv: list[str]) -> subprocess.CompletedProcess[bytes]:
        # qemu-user passes the stub's execve of a host program to the kernel.
        return subprocess.run([qemu, "-0", argv[0], str(path), *argv[1:]],
                              env={"PATH": "/bin", "MARK": "env-kept"},
                              capture_output=True, timeout=30)
    return run


@pytest.mark.parametrize("machine", sorted(MACHINES))
def test_stub_execs_what_the_runtime_asks(tmp_path: Path, machine: str) -> None:
    run = runner(machine, tmp_path)
    r = run(execstub.argv("/bin/sh", ["name0", "-c", 'echo "$0 $MARK"']))
    assert (r.returncode, r.stdout, r.stderr) == (0, b"name0 env-kept\n", b"")
    # A failed execve is told on stderr, as a shell tells it.
    r = run(execstub.argv("/no/such/file", ["x"]))
    assert (r.returncode, r.stdout, r.stderr) == (127, b"", b"berth: exec failed: errno 2\n")
    # As a #! interpreter, argv[0] is the interpreter's path: the stub runs nothing.
    for argv in (["/proc/self/exe", "/bin/sh", "-c", "echo ran"], ["berth-e", "/bin/true"],
                 ["berth-exx", "/bin/true"], ["xerth-ex", "/bin/true"], ["berth-ex"]):
        r = run(argv)
        assert (r.returncode, r.stdout, r.stderr) == (127, b"", b""), argv


def test_memfd_is_sealed() -> None:
    """What /proc/<pid>/exe of a running stub reaches: nothing can write to it, by any
    path, whatever the caller's capabilities (seals bind root too)."""
    fd = execstub.open_sealed()
    assert fd >= 0, f"no exec stub for {platform.machine()}"
    try:
        assert os.pread(fd, 4096, 0) == execstub.elf()
        with pytest.raises(PermissionError):
            os.pwrite(fd, b"\xcc", 200)
        with pytest.raises(PermissionError):
            os.ftruncate(fd, 0)
        try:
            again = os.open(f"/proc/self/fd/{fd}", os.O_WRONLY)
        except PermissionError:
            again = -1  # not root: mode 0555 already refuses
        if again >= 0:
            try:
                with pytest.raises(PermissionError):
                    os.write(again, b"\xcc")
            finally:
                os.close(again)
    finally:
        os.close(fd)
