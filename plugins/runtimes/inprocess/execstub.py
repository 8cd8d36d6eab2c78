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

The machine code below is assembled from :data:`SOURCE_X86_64` and
:data:`SOURCE_AARCH64` (``as``, then ``objcopy -O binary -j .text``);
``tests/unit/test_execstub.py`` assembles them again and compares, and runs both. The ELF
around the code (one header, one read+exec PT_LOAD segment) is built here. On other
machines there is no stub and the runtime execs the command itself (it logs a warning).
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

SOURCE_AARCH64 = r"""
	.text
	.globl _start
_start:
	ldr	x19, [sp]               // argc
	cmp	x19, #2
	b.lo	refuse
	ldr	x1, [sp, #8]            // argv[0] must be "berth-ex"
	ldrb	w2, [x1]
	cmp	w2, #0x62
	b.ne	refuse
	ldur	x2, [x1, #1]
	mov	x3, #0x7265
	movk	x3, #0x6874, lsl #16
	movk	x3, #0x652d, lsl #32
	movk	x3, #0x0078, lsl #48
	cmp	x2, x3
	b.ne	refuse
	ldr	x0, [sp, #16]           // execve(argv[1], argv + 2, envp)
	add	x1, sp, #24
	add	x2, sp, x19, lsl #3
	add	x2, x2, #16
	mov	x8, #221
	svc	#0
	neg	x4, x0                  // errno, written right to left below the stack
	sub	sp, sp, #128
	add	x5, sp, #127
	mov	x6, #10
	strb	w6, [x5]
1:	udiv	x7, x4, x6
	msub	x9, x7, x6, x4
	add	x9, x9, #48
	sub	x5, x5, #1
	strb	w9, [x5]
	mov	x4, x7
	cbnz	x4, 1b
	adr	x10, prefix
	mov	x11, #(prefix_end - prefix)
2:	sub	x11, x11, #1
	ldrb	w12, [x10, x11]
	sub	x5, x5, #1
	strb	w12, [x5]
	cbnz	x11, 2b
	mov	x0, #2                  // write(2, message, length)
	mov	x1, x5
	add	x2, sp, #128
	sub	x2, x2, x5
	mov	x8, #64
	svc	#0
refuse:
	mov	x0, #127                // exit_group(127)
	mov	x8, #94
	svc	#0
prefix:
	.ascii	"berth: exec failed: errno "
prefix_end:
"""

CODE_AARCH64 = bytes.fromhex(
    "f30340f97f0a00f163050054e10740f9220040395f880171e1040054221040f8a34c8ed2830eadf2"
    "a3a5ccf2030fe0f25f0003eb01040054e00b40f9e1630091e26f338b42400091a81b80d2010000d4"
    "e40300cbff0302d1e5ff0191460180d2a60000398708c69ae990069b29c10091a50400d1a9000039"
    "e40307aa44ffffb50a0200104b0380d26b0500d14c696b38a50400d1ac0000398bffffb5400080d2"
    "e10305aae2030291420005cb080880d2010000d4e00f80d2c80b80d2010000d462657274683a2065"
    "786563206661696c65643a206572726e6f20")

_EM = {"x86_64": 62, "aarch64": 183}
_CODE = {"x86_64": CODE_X86_64, "aarch64": CODE_AARCH64}
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
