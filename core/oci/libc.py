"""libc, loaded once per process.

``ctypes.util.find_library`` runs ``ldconfig -p`` on every call: a shim would pay for
it per container, and its Reaper would reap that ldconfig. The shims' zygote loads
libc before forking them.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools


@functools.cache
def load_libc() -> ctypes.CDLL:
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
