"""The exec stub (``berth.plugins.runtimes.inprocess.execstub``): its machine code is what
its assembly source says, and, run from its sealed memfd, it execs only when asked by
the runtime and cannot be changed. No root needed."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from berth.plugins.runtimes.inprocess import execstub

pytestmark = pytest.mark.skipif(platform.machine() != "x86_64",
                                reason="the stub exists for x86_64 only")


def test_code_is_the_assembled_source(tmp_path: Path) -> None:
    assert shutil.which("as") and shutil.which("objcopy"), "binutils (gcc) is needed"
    (tmp_path / "stub.S").write_text(execstub.SOURCE_X86_64)
    subprocess.run(["as", "--64", "-o", str(tmp_path / "stub.o"), str(tmp_path / "stub.S")],
                   check=True)
    subprocess.run(["objcopy", "-O", "binary", "-j", ".text", str(tmp_path / "stub.o"),
                    str(tmp_path / "stub.bin")], check=True)
    assert (tmp_path / "stub.bin").read_bytes() == execstub.CODE_X86_64


def run_stub(argv: list[str]) -> subprocess.CompletedProcess[bytes]:
    fd = execstub.open_sealed()
    assert fd >= 0
    try:
        # The memfd is close-on-exec: run it from a copy the child inherits.
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


def test_stub_execs_what_the_runtime_asks_with_argv_and_env() -> None:
    r = run_stub(execstub.argv("/bin/sh", ["name0", "-c", 'echo "$0 $MARK"']))
    assert (r.returncode, r.stdout, r.stderr) == (0, b"name0 env-kept\n", b"")


def test_stub_reports_a_failed_execve_on_stderr() -> None:
    r = run_stub(execstub.argv("/no/such/file", ["x"]))
    assert (r.returncode, r.stdout, r.stderr) == (127, b"", b"berth: exec failed: errno 2\n")


def test_stub_is_no_interpreter() -> None:
    # As a #! interpreter, argv[0] is the interpreter's path: the stub runs nothing.
    for argv in (["/proc/self/exe", "/bin/sh", "-c", "echo ran"], ["berth-e", "/bin/true"],
                 ["berth-exx", "/bin/true"], ["berth-ex"]):
        r = run_stub(argv)
        assert (r.returncode, r.stdout, r.stderr) == (127, b"", b""), argv


def test_memfd_is_sealed() -> None:
    """What /proc/<pid>/exe of a running stub reaches: nothing can write to it, by any
    path, whatever the caller's capabilities (seals bind root too)."""
    fd = execstub.open_sealed()
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
