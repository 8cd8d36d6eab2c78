"""The hand-over between berthd and berth's shim: the one shim module berthd imports.

For berth's own shim, berthd does the ``start`` action's steps itself (claim the group's
socket, ask the warm zygote to fork a shim on it, settle the shim's cgroup and OOM score)
rather than run the shim binary: an interpreter start saved per container
(``berth.core.runtime.binary``). Both sides import these steps and the zygote's request
format from here, so they cannot drift apart:

- the zygote's socket (``zygote_path``, named by ``code_key``: a zygote never serves code
  older than the files on disk);
- a request (``make_request``: JSON argv, working directory, environment; the listening
  socket rides along with SCM_RIGHTS, see ``passing``) and its one answer (``read_reply``:
  ``{"pid": N}`` or ``{"error": "..."}``);
- ``claim``/``release``/``settle``: the group socket and the new shim's place.

Only the standard library and small shim modules: this runs on the critical path of
every container start.
"""

from __future__ import annotations

import array
import contextlib
import json
import os
import socket
import sys
import time

from berth.core.shim import address as addr, host, wire
from berth.core.shim.flags import Flags, to_argv

__all__ = [
    "REPLY_MAX", "REQUEST_TIMEOUT", "Flags", "claim", "code_key", "make_request", "passing",
    "read_reply", "release", "request", "serve_request", "settle", "zygote_path",
]

REQUEST_TIMEOUT = 30.0
REPLY_MAX = 4096
# Code the shims run: a change to any of these files means a new zygote.
_CODE_DIRS = ("core", "core/shim", "core/ttrpc", "core/oci", "core/events", "core/grpc",
              "plugins/runtimes/ocicli", "plugins/runtimes/inprocess")
_KEY_TTL = 1.0
_key_cache: tuple[float, str] = (-_KEY_TTL, "")


def code_key() -> str:
    """A digest of the interpreter and the shim's source files (names, sizes, mtimes).

    Kept for a second: berthd asks once per container, and a burst of starts need
    not stat a hundred files each.
    """
    global _key_cache
    now = time.monotonic()
    if now - _key_cache[0] < _KEY_TTL:
        return _key_cache[1]
    key = _compute_code_key()
    _key_cache = (now, key)
    return key


def _compute_code_key() -> str:
    h = addr.sha256(os.path.realpath(sys.executable).encode() + sys.version.encode())
    top = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    for rel in _CODE_DIRS:
        directory = os.path.join(top, rel)
        try:
            names = sorted(os.listdir(directory))
        except OSError:
            continue
        for name in names:
            if not name.endswith(".py"):
                continue
            with contextlib.suppress(OSError):
                st = os.stat(os.path.join(directory, name))
                h.update(f"{rel}/{name}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def zygote_path(daemon_address: str) -> str:
    name = f"zygote-{code_key()}"
    path = os.path.join(addr.socket_dir(daemon_address), name)
    if len(path) > addr.SOCKET_PATH_LIMIT:
        path = os.path.join(addr.FALLBACK_SOCKET_DIR, name)
    return path


# -- the requesting side (the ``start`` action) ---------------------------------------------


def make_request(argv: list[str], cwd: str, env: dict[str, str]) -> bytes:
    return json.dumps({"argv": argv, "cwd": cwd, "env": env}).encode()


def request(path: str, payload: bytes, listener: socket.socket,
            timeout: float = REQUEST_TIMEOUT) -> int | None:
    """Ask the zygote at ``path`` for a shim; its pid, or None when no zygote answers."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    s.settimeout(timeout)
    try:
        try:
            s.connect(path)
        except OSError:
            return None
        s.sendmsg([payload], passing(listener))
        reply = s.recv(REPLY_MAX)
    except OSError:
        return None
    finally:
        s.close()
    return read_reply(reply)


def passing(listener: socket.socket) -> list[tuple[int, int, bytes]]:
    """The ancillary data that hands ``listener`` to the zygote with a request."""
    fds = array.array("i", [listener.fileno()])
    return [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds.tobytes())]


def read_reply(reply: bytes) -> int | None:
    """The shim's pid from a zygote's answer; None for no usable answer, RuntimeError
    for the zygote's own error."""
    try:
        answer = json.loads(reply)
    except ValueError:
        return None
    if not isinstance(answer, dict):
        return None
    if "error" in answer:
        raise RuntimeError(f"zygote: {answer['error']}")
    pid = answer.get("pid")
    return pid if isinstance(pid, int) and pid > 0 else None


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


def serve_flags(flags: Flags) -> list[str]:
    serve = Flags(namespace=flags.namespace, id=flags.id, address=flags.address,
                  publish_binary=flags.publish_binary, debug=flags.debug)
    return to_argv(serve)


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
        # No fsync (berthd runs this on its event loop, once per container): the file
        # names the socket of a live shim, and is read only to reach that shim again
        # after berthd restarts. A crash of berthd alone keeps the page cache, so the
        # renamed file is there; a crash of the machine takes every shim with it, and
        # an address file that is then empty or gone reads as a dead shim, which is
        # what it is (as the bundle's other files, written without fsync, see
        # ``berth.core.runtime.bundle.Bundle.write``).
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
    return make_request(serve_flags(flags), bundle, env)


