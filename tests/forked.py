"""Run a function in a forked child and get back the text it returns.

For tests of process-wide state (a seccomp filter, madvise flags, no_new_privs) that must
not touch the test runner itself. The child never returns into pytest: it exits with 0
after sending the result, 1 on any exception.
"""

from __future__ import annotations

import os
from collections.abc import Callable


def in_child(fn: Callable[[], str]) -> str:
    """``fn()`` run in a forked child; AssertionError if the child failed."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.close(r)
            os.write(w, fn().encode())
            code = 0
        finally:
            os._exit(code)
    os.close(w)
    try:
        chunks = []
        while chunk := os.read(r, 65536):
            chunks.append(chunk)
    finally:
        os.close(r)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, "the child failed"
    return b"".join(chunks).decode()
