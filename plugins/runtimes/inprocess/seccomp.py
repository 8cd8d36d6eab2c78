"""OCI ``linux.seccomp`` compiled to a BPF program with libseccomp (ctypes, libseccomp.so.2).

Compiling happens in the runtime before fork; the container process only installs the
exported program with one ``seccomp(2)`` call right before execve, so the child never
loads libseccomp. Behaviour follows runc: unknown syscall names are skipped, a rule whose
action equals the default action is dropped, SCMP_ACT_ERRNO/TRACE default to EPERM, and
several conditions on the same argument index become separate rules (OR), otherwise the
conditions of one entry are ANDed.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
from typing import Any

from berth.core import errdefs

_ACT_KILL_THREAD = 0x00000000
_ACT_KILL_PROCESS = 0x80000000
_ACT_TRAP = 0x00030000
_ACT_ERRNO = 0x00050000
_ACT_TRACE = 0x7FF00000
_ACT_LOG = 0x7FFC0000
_ACT_ALLOW = 0x7FFF0000

_OPS = {
    "SCMP_CMP_NE": 1, "SCMP_CMP_LT": 2, "SCMP_CMP_LE": 3, "SCMP_CMP_EQ": 4,
    "SCMP_CMP_GE": 5, "SCMP_CMP_GT": 6, "SCMP_CMP_MASKED_EQ": 7,
}
FLAGS = {
    "SECCOMP_FILTER_FLAG_TSYNC": 1,
    "SECCOMP_FILTER_FLAG_LOG": 2,
    "SECCOMP_FILTER_FLAG_SPEC_ALLOW": 4,
}
_NR_SCMP_ERROR = -1


class _ArgCmp(ctypes.Structure):
    _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int), ("datum_a", ctypes.c_uint64),
                ("datum_b", ctypes.c_uint64)]


_lib: ctypes.CDLL | None = None


def _libseccomp() -> ctypes.CDLL:
    global _lib
    if _lib is None:
        try:
            lib = ctypes.CDLL("libseccomp.so.2")
        except OSError as e:
            raise errdefs.FailedPrecondition(f"seccomp: libseccomp.so.2 unavailable: {e}"
                                             ) from None
        lib.seccomp_init.restype = ctypes.c_void_p
        lib.seccomp_init.argtypes = [ctypes.c_uint32]
        lib.seccomp_release.argtypes = [ctypes.c_void_p]
        lib.seccomp_arch_add.argtypes = [ctypes.c_void_p, ctypes.c_uint32]
        lib.seccomp_arch_resolve_name.restype = ctypes.c_uint32
        lib.seccomp_arch_resolve_name.argtypes = [ctypes.c_char_p]
        lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
        lib.seccomp_rule_add_array.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int,
                                               ctypes.c_uint, ctypes.POINTER(_ArgCmp)]
        lib.seccomp_attr_set.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32]
        lib.seccomp_export_bpf.argtypes = [ctypes.c_void_p, ctypes.c_int]
        _lib = lib
    return _lib


def action(name: str, errno_ret: int | None) -> int:
    """The libseccomp action value of an OCI action name."""
    if name == "SCMP_ACT_ERRNO":
        return _ACT_ERRNO | ((errno.EPERM if errno_ret is None else errno_ret) & 0xFFFF)
    if name == "SCMP_ACT_TRACE":
        return _ACT_TRACE | ((errno.EPERM if errno_ret is None else errno_ret) & 0xFFFF)
    fixed = {
        "SCMP_ACT_KILL": _ACT_KILL_THREAD, "SCMP_ACT_KILL_THREAD": _ACT_KILL_THREAD,
        "SCMP_ACT_KILL_PROCESS": _ACT_KILL_PROCESS, "SCMP_ACT_TRAP": _ACT_TRAP,
        "SCMP_ACT_LOG": _ACT_LOG, "SCMP_ACT_ALLOW": _ACT_ALLOW,
    }
    if name not in fixed:
        raise errdefs.InvalidArgument(f"seccomp: unsupported action {name!r}")
    return fixed[name]


def _arch_name(oci: str) -> str:
    return oci.removeprefix("SCMP_ARCH_").lower()


def rules(seccomp: dict[str, Any]) -> list[tuple[str, int, list[tuple[int, int, int, int]]]]:
    """(syscall name, action, [(index, op, value, valueTwo)]) for each rule to add."""
    default = action(seccomp.get("defaultAction") or "SCMP_ACT_ALLOW",
                     seccomp.get("defaultErrnoRet"))
    out: list[tuple[str, int, list[tuple[int, int, int, int]]]] = []
    for entry in seccomp.get("syscalls") or []:
        act = action(entry.get("action") or "", entry.get("errnoRet"))
        if act == default:
            continue
        conds = []
        for a in entry.get("args") or []:
            op = _OPS.get(a.get("op"))
            if op is None:
                raise errdefs.InvalidArgument(f"seccomp: unknown operator {a.get('op')!r}")
            conds.append((int(a.get("index", 0)), op, int(a.get("value", 0)),
                          int(a.get("valueTwo", 0))))
        names = entry.get("names") or ([entry["name"]] if entry.get("name") else [])
        for name in names:
            if len(conds) > 1 and len({c[0] for c in conds}) == 1:
                # Several conditions on one argument can never all hold: runc ORs them.
                out.extend((name, act, [c]) for c in conds)
            else:
                out.append((name, act, conds))
    return out


# Compiled programs by profile: a CRI RuntimeDefault profile takes libseccomp ~10 ms of
# CPU to compile, and every container of a pod and every ExecSync (probes) asks again.
_compiled: dict[str, tuple[bytes, int]] = {}
_COMPILED_MAX = 16


def build(seccomp: dict[str, Any]) -> tuple[bytes, int]:
    """(BPF program, seccomp(2) flags) for the OCI seccomp section."""
    try:
        key = json.dumps(seccomp, sort_keys=True)
    except (TypeError, ValueError):
        return _build(seccomp)  # not JSON: _build says what is wrong with it
    hit = _compiled.get(key)
    if hit is None:
        hit = _build(seccomp)
        if len(_compiled) >= _COMPILED_MAX:
            _compiled.pop(next(iter(_compiled)))
        _compiled[key] = hit
    return hit


def _build(seccomp: dict[str, Any]) -> tuple[bytes, int]:
    lib = _libseccomp()
    if seccomp.get("listenerPath"):
        raise errdefs.InvalidArgument("seccomp: notify listeners are not supported")
    flags = 0
    for f in seccomp.get("flags") or []:
        if f not in FLAGS:
            raise errdefs.InvalidArgument(f"seccomp: unsupported flag {f!r}")
        flags |= FLAGS[f]
    default = action(seccomp.get("defaultAction") or "SCMP_ACT_ALLOW",
                     seccomp.get("defaultErrnoRet"))
    ctx = lib.seccomp_init(default)
    if not ctx:
        raise errdefs.InvalidArgument("seccomp: seccomp_init failed")
    try:
        for arch in seccomp.get("architectures") or []:
            token = lib.seccomp_arch_resolve_name(_arch_name(arch).encode())
            if token == 0:
                raise errdefs.InvalidArgument(f"seccomp: unknown architecture {arch!r}")
            rc = lib.seccomp_arch_add(ctx, token)
            if rc < 0 and rc != -errno.EEXIST:
                raise errdefs.InvalidArgument(f"seccomp: adding {arch}: {os.strerror(-rc)}")
        for name, act, conds in rules(seccomp):
            nr = lib.seccomp_syscall_resolve_name(name.encode())
            if nr == _NR_SCMP_ERROR:
                continue  # unknown on this kernel/arch: skipped, like runc
            array = (_ArgCmp * max(len(conds), 1))(*[_ArgCmp(*c) for c in conds])
            rc = lib.seccomp_rule_add_array(ctx, act, nr, len(conds), array)
            if rc < 0:
                raise errdefs.InvalidArgument(
                    f"seccomp: rule for {name}: {os.strerror(-rc)}")
        fd = os.memfd_create("seccomp-bpf", os.MFD_CLOEXEC)
        try:
            rc = lib.seccomp_export_bpf(ctx, fd)
            if rc < 0:
                raise errdefs.Internal(f"seccomp: export: {os.strerror(-rc)}")
            os.lseek(fd, 0, os.SEEK_SET)
            chunks = []
            while chunk := os.read(fd, 1 << 16):
                chunks.append(chunk)
            return b"".join(chunks), flags
        finally:
            os.close(fd)
    finally:
        lib.seccomp_release(ctx)
