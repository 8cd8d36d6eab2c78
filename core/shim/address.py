"""Where a shim listens, and which shim a new container joins.

containerd-shim-runc-v2 listens on ``/run/containerd/s/<sha256(address/ns/id)>``.
Berth's shim keeps its sockets beside the daemon that started it: in ``s/`` next to
the daemon's gRPC socket (``/run/containerd/s``, ``/run/berth/s``, a test's temporary
folder), so that several daemons never share a socket directory, and falls back to
``/run/berth/s`` when that path would not fit in a sockaddr_un. The hash input is
prefixed with the shim's name, so berth's and runc's shims never collide even in one
directory.

Containers that name a group (the CRI sandbox id, or berth's own group annotation)
share the group's shim: every member hashes the group id, so the second ``start``
finds the first shim's socket alive and prints its address.

Only the standard library is imported here: ``start`` and ``delete`` must be cheap.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import stat

try:  # the builtin module loads faster than hashlib's OpenSSL binding
    from _sha256 import sha256
except ImportError:  # pragma: no cover
    from hashlib import sha256

SHIM_NAME = "containerd-shim-berth-v1"
FALLBACK_SOCKET_DIR = "/run/berth/s"
# sizeof(sockaddr_un.sun_path) is 108, less the terminating NUL; Go allows 106.
SOCKET_PATH_LIMIT = 106
GROUP_ANNOTATIONS = ("io.containerd.berth.v1.group", "io.kubernetes.cri.sandbox-id")
ADDRESS_FILE = "address"


def socket_dir(daemon_address: str) -> str:
    """``s/`` beside the daemon's socket (``unix://`` or a plain path)."""
    path = daemon_address.removeprefix("unix://")
    parent = os.path.dirname(path) if path else ""
    return os.path.join(parent, "s") if parent else FALLBACK_SOCKET_DIR


def socket_name(daemon_address: str, namespace: str, group: str) -> str:
    key = "\0".join((SHIM_NAME, daemon_address, namespace, group))
    return sha256(key.encode()).hexdigest()


def socket_address(daemon_address: str, namespace: str, group: str) -> str:
    """``unix://<dir>/<hash>`` for the shim serving ``group`` in ``namespace``."""
    name = socket_name(daemon_address, namespace, group)
    path = os.path.join(socket_dir(daemon_address), name)
    if len(path) > SOCKET_PATH_LIMIT:
        path = os.path.join(FALLBACK_SOCKET_DIR, name)
    return "unix://" + path


def socket_path(address: str) -> str:
    return address.removeprefix("unix://")


def group_of(annotations: dict[str, str] | None, container_id: str) -> str:
    """The id whose shim serves this container: a group annotation, else itself."""
    for key in GROUP_ANNOTATIONS:
        value = (annotations or {}).get(key)
        if value:
            return value
    return container_id


def read_annotations(bundle: str) -> dict[str, str]:
    """The annotations of ``<bundle>/config.json`` (the start action needs nothing else)."""
    with open(os.path.join(bundle, "config.json"), "rb") as f:
        spec = json.load(f)
    annotations = spec.get("annotations") if isinstance(spec, dict) else None
    return annotations if isinstance(annotations, dict) else {}


def write_atomic(path: str, data: str) -> None:
    """Write and rename, so that no reader sees a torn file.

    Without the fsync the Go shim does (O_SYNC): the files written here describe live
    processes, which a crash of the machine ends too (see ``handover.claim``).
    """
    directory, base = os.path.split(os.path.abspath(path))
    tmp = os.path.join(directory, f".{base}.{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        os.write(fd, data.encode())
    finally:
        os.close(fd)
    os.rename(tmp, path)


def read_address(bundle: str) -> str:
    with open(os.path.join(bundle, ADDRESS_FILE)) as f:
        return f.read().strip()


def can_connect(address: str) -> bool:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    s.settimeout(0.5)
    try:
        s.connect(socket_path(address))
        return True
    except OSError:
        return False
    finally:
        s.close()


def listen(address: str) -> socket.socket | None:
    """A listening socket on ``address`` (mode 0600), or None when a live shim owns it.

    A socket file nobody answers on is left over from a dead shim and is replaced.
    """
    path = socket_path(address)
    os.makedirs(os.path.dirname(path), mode=0o711, exist_ok=True)
    for _ in range(2):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            # The umask keeps the socket private between bind and chmod.
            old = os.umask(0o177)
            try:
                sock.bind(path)
            finally:
                os.umask(old)
            os.chmod(path, 0o600)
            sock.listen(socket.SOMAXCONN)
            return sock
        except OSError as exc:
            sock.close()
            if exc.errno != errno.EADDRINUSE:
                raise
        if can_connect(address):
            return None
        try:
            if not stat.S_ISSOCK(os.lstat(path).st_mode):
                raise OSError(errno.EADDRINUSE, f"{path} exists and is not a socket")
            os.unlink(path)
        except FileNotFoundError:
            pass
    raise OSError(errno.EADDRINUSE, f"{path}: address in use")


def remove_socket(address: str) -> None:
    try:
        os.unlink(socket_path(address))
    except FileNotFoundError:
        pass
