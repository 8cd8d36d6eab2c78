"""The ``start`` action: bind the shim's socket, get a shim serving on it, print it.

As containerd's runc manager does it: the shim's address is derived from the daemon's
address, the namespace and the container's group (``berth.core.shim.address``); when a live
shim already owns it, this container joins that shim. Otherwise the socket is bound
here, so that containerd can connect as soon as the address is printed, and handed
to a forked shim (through the zygote when one runs, see ``berth.core.shim.zygote``). The
address is also written to ``<bundle>/address`` and printed without a newline.

Only the standard library and small berth modules are imported: this runs for every
container, on the critical path of ``ctr run``.
"""

from __future__ import annotations

import os
import socket
import sys

from berth.core.shim import handover, zygote
from berth.core.shim.flags import Flags
from berth.core.shim.handover import (  # noqa: F401 - the start action's side
    RUNC_OPTIONS,
    claim,
    release,
    serve_flags,
    serve_request,
    settle,
    shim_cgroup,
)


def start(flags: Flags, options: bytes, *, use_zygote: bool = True) -> str:
    """Make sure a shim serves this container; its address."""
    bundle = os.getcwd()
    address, listener = claim(flags, bundle)
    if listener is None:
        return address
    try:
        pid = spawn(flags, listener, bundle, use_zygote=use_zygote)
    except BaseException:
        release(address, listener)
        raise
    listener.close()
    settle(pid, options, parent=os.getppid(), follow=use_zygote)
    return address


def spawn(flags: Flags, listener: socket.socket, bundle: str, *, use_zygote: bool) -> int:
    """A shim process serving on ``listener``: forked by the zygote, or by us."""
    argv = serve_flags(flags)
    if use_zygote:
        payload = zygote.make_request(argv, bundle, dict(os.environ))
        path = zygote.zygote_path(flags.address)
        pid = handover.request(path, payload, listener)
        if pid is None:
            pid = zygote.fork_zygote(path, payload, listener)
        if pid is not None:
            return pid
    return fork_shim(flags, listener)


def fork_shim(flags: Flags, listener: socket.socket) -> int:
    """Fork the shim from this process (no zygote): it imports what it needs itself."""
    pid = os.fork()
    if pid:
        return pid
    code = 1
    try:
        os.setsid()
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)
        from berth.core.shim import serve

        code = serve.run(flags, listener)
    except BaseException as exc:  # noqa: B036 - nothing may escape a forked child
        # stderr is /dev/null now: the container's log (the bundle is our cwd) gets it.
        from berth.core.shim import logging as shim_logging

        shim_logging.report_failure(os.getcwd(), "shim failed", exc,
                                    namespace=flags.namespace, id=flags.id)
    finally:
        os._exit(code)


def read_stdin() -> bytes:
    """The options containerd writes on stdin (nothing when stdin is a terminal)."""
    try:
        if os.isatty(0):
            return b""
        return sys.stdin.buffer.read()
    except (OSError, ValueError):
        return b""
