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

from berth.core.shim import address as addr, host, wire, zygote
from berth.core.shim.flags import Flags, to_argv

RUNC_OPTIONS = "containerd.runc.v1.Options"


def shim_cgroup(options: bytes) -> str:
    """``shim_cgroup`` (field 3) of runc options sent on stdin, if any."""
    if not options:
        return ""
    try:
        type_url, value = wire.decode_any(options)
        if type_url.rsplit("/", 1)[-1] != RUNC_OPTIONS:
            return ""
        return wire.string_fields(value).get(3, "")
    except ValueError:
        return ""


def _serve_flags(flags: Flags) -> list[str]:
    serve = Flags(namespace=flags.namespace, id=flags.id, address=flags.address,
                  publish_binary=flags.publish_binary, debug=flags.debug)
    return to_argv(serve)


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


def claim(flags: Flags, bundle: str) -> tuple[str, socket.socket | None]:
    """The address of the shim for this container's group, written to the bundle, and
    a socket listening on it for a new shim; None when a live shim serves the group
    already (the container joins it).

    berthd runs these steps itself for berth's own shim (``berth.core.runtime.binary``),
    with its request to the zygote in between, instead of running this action.
    """
    group = addr.group_of(addr.read_annotations(bundle), flags.id)
    address = addr.socket_address(flags.address, flags.namespace, group)
    listener = addr.listen(address)
    try:
        addr.write_atomic(os.path.join(bundle, addr.ADDRESS_FILE), address)
    except BaseException:
        if listener is not None:
            release(address, listener)
        raise
    return address, listener


def release(address: str, listener: socket.socket) -> None:
    """Give up a claimed socket (no shim came to serve it)."""
    listener.close()
    addr.remove_socket(address)


def settle(pid: int, options: bytes, *, parent: int, follow: bool) -> None:
    """Put a new shim where containerd's runc manager puts it: the runtime options'
    ``shim_cgroup`` (else, with ``follow``, the caller's cgroups), OOM score above
    ``parent``'s."""
    cgroup = shim_cgroup(options)
    if cgroup:
        host.join_static_cgroup(pid, cgroup)
    elif follow:
        host.follow_cgroups(pid)
    host.adjust_oom_score(pid, parent)


def serve_request(flags: Flags, bundle: str, env: dict[str, str]) -> bytes:
    """The request a zygote takes to fork this container's shim."""
    return zygote.make_request(_serve_flags(flags), bundle, env)


def spawn(flags: Flags, listener: socket.socket, bundle: str, *, use_zygote: bool) -> int:
    """A shim process serving on ``listener``: forked by the zygote, or by us."""
    argv = _serve_flags(flags)
    if use_zygote:
        payload = zygote.make_request(argv, bundle, dict(os.environ))
        path = zygote.zygote_path(flags.address)
        pid = zygote.request(path, payload, listener)
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
    except BaseException:  # noqa: B036 - nothing may escape a forked child
        pass
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
