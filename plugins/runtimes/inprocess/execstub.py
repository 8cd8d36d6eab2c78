"""The exec stub: the container's command is exec'ed by a tiny sealed program, not by Python.

The process that sets a container process up is a fork of the shim, so until its last
``execve`` its ``/proc/self/exe`` is the host's Python interpreter. A file in the image
starting with ``#!/proc/self/exe`` would make the kernel run that interpreter inside the
container, where its writable host binary can be reached again (CVE-2019-5736: runc
answers it by re-executing itself from a sealed memfd). berth answers it the same way
for the one step that matters: the set-up process execs this stub from a sealed memfd,
and the stub execs the container's command. While the kernel resolves the command's
``#!`` line, ``/proc/self/exe`` is the stub (a sealed, unwritable memfd); run on its
own, the stub only execs what it is told, which a container can do anyway.

The stub's contract: ``argv[0]`` is :data:`MAGIC` (any other ``argv[0]`` exits 127 at
once, so a ``#!/proc/self/exe`` script, whose ``argv[0]`` is the interpreter's path, runs
nothing), then ``execve(argv[1], &argv[2], envp)``; when that fails it writes
``berth: exec failed: errno N`` on stderr and exits 127, as a shell does. The stub is
handed nothing but the container's own stdio: it becomes dumpable again (execve resets
that), so it must hold nothing of the shim. The runtime checks what it can before
(``steps.lookup``: a regular, executable file), so most failures are still reported
as errors of the exec request.

The machine code below is assembled from :data:`SOURCE_X86_64` (``as --64``, then
``objcopy -O binary -j .text``); ``tests/unit/test_execstub.py`` assembles it again and
compares. The ELF around it (one header, one read+exec PT_LOAD segment) is built here.
"""

from __future__ import annotations

import errno
import fcntl
import os
import platform
import struct

MAGIC = "berth-ex"

SOURCE_X86_64 = r"""
	.text
	.globl _start
_start:
	mov	(%rsp), %r12            # argc
	cmp	$2, %r12
	jb	refuse
	mov	8(%rsp), %rsi           # argv[0] must be "berth-ex"
	movabs	$0x0078652d68747265, %rax
	cmp	%rax, 1(%rsi)
	jne	refuse
	cmpb	$0x62, (%rsi)
	jne	refuse
	mov	16(%rsp), %rdi          # execve(argv[1], argv + 2, envp)
	lea	24(%rsp), %rsi
	lea	16(%rsp,%r12,8), %rdx
	mov	$59, %eax
	syscall
	neg	%rax                    # errno, written right to left below the stack
	sub	$128, %rsp
	lea	127(%rsp), %rdi
	movb	$10, (%rdi)
	mov	$10, %ecx
1:	xor	%edx, %edx
	div	%rcx
	add	$48, %edx
	dec	%rdi
	mov	%dl, (%rdi)
	test	%rax, %rax
	jnz	1b
	lea	prefix(%rip), %rsi
	mov	$prefix_end - prefix, %ecx
2:	dec	%rdi
	movzbl	-1(%rsi,%rcx), %eax
	mov	%al, (%rdi)
	dec	%ecx
	jnz	2b
	lea	128(%rsp), %rdx         # write(2, message, length)
	sub	%rdi, %rdx
	mov	%rdi, %rsi
	mov	$2, %edi
	mov	$1, %eax
	syscall
refuse:
	mov	$127, %edi              # exit_group(127)
	mov	$231, %eax
	syscall
prefix:
	.ascii	"berth: exec failed: errno "
prefix_end:
"""

CODE_X86_64 = bytes.fromhex(
    "4c8b24244983fc020f828d000000488b74240848b8657274682d657800483946017578803e627573"
    "488b7c2410488d7424184a8d54e410b83b0000000f0548f7d84881ec80000000488d7c247fc6070a"
    "b90a00000031d248f7f183c23048ffcf88174885c075ee488d3539000000b91a00000048ffcf0fb6"
    "440eff8807ffc975f2488d9424800000004829fa4889febf02000000b8010000000f05bf7f000000"
    "b8e70000000f0562657274683a2065786563206661696c65643a206572726e6f20")

_EM = {"x86_64": 62}
_CODE = {"x86_64": CODE_X86_64}
_BASE = 0x400000
_EHDR = 64
_PHDR = 56


def supported(machine: str | None = None) -> bool:
    return (machine or platform.machine()) in _CODE


def elf(machine: str | None = None) -> bytes:
    """The stub as a static ELF executable for ``machine`` (default: this one)."""
    machine = machine or platform.machine()
    code = _CODE[machine]
    entry = _BASE + _EHDR + _PHDR
    size = _EHDR + _PHDR + len(code)
    ident = b"\x7fELF" + bytes([2, 1, 1, 0]) + bytes(8)  # 64-bit, little-endian, SysV
    ehdr = ident + struct.pack("<HHIQQQIHHHHHH", 2, _EM[machine], 1, entry, _EHDR, 0, 0,
                               _EHDR, _PHDR, 1, 0, 0, 0)
    phdr = struct.pack("<IIQQQQQQ", 1, 5, 0, _BASE, _BASE, size, size, 0x1000)  # PT_LOAD, R+X
    return ehdr + phdr + code


def open_sealed() -> int:
    """A close-on-exec memfd holding the stub, sealed against any change (fd or -1 when
    this machine has no stub or no executable memfds)."""
    if not supported():
        return -1
    flags = os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING
    try:
        # Kernels with vm.memfd_noexec know MFD_EXEC (0x10) and may want it said.
        fd = os.memfd_create("berth-exec", flags | 0x10)
    except OSError as e:
        if e.errno != errno.EINVAL:
            return -1
        fd = os.memfd_create("berth-exec", flags)
    try:
        data = elf()
        os.write(fd, data)
        os.fchmod(fd, 0o555)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SEAL | fcntl.F_SEAL_SHRINK
                    | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE)
    except BaseException:
        os.close(fd)
        raise
    return fd


def argv(path: str, args: list[str]) -> list[str]:
    """What the stub is exec'ed with to exec ``path`` with ``args``."""
    return [MAGIC, path, *args]
