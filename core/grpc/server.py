"""berthd's gRPC server: trio listeners on a unix socket (and optionally TCP).

Each accepted connection is served by ``connection.Connection`` in a task of its own
behind a boundary: whatever one connection's input makes go wrong (a bug of ours
included) ends that connection with a log line, never the server or the daemon.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import structlog
import trio

from berth.core.grpc import bridge
from berth.core.grpc.bridge import Method
from berth.core.grpc.connection import Connection, Router

log = structlog.get_logger("grpc")

_ACCEPT_RETRY_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}


def _unix_listener(path: Path, uid: int = 0, gid: int = 0) -> socket.socket:
    path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(path))
        os.chmod(path, 0o660)
        if os.geteuid() == 0:
            os.chown(path, uid, gid)
        sock.listen(1024)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


async def serve_connection(router: Router, stream: trio.abc.Stream) -> None:
    """One connection, start to end; nothing it raises leaves (except cancellation)."""
    try:
        async with stream:
            await Connection(router).serve(stream)
    except Exception:
        log.exception("gRPC connection failed; closed")


async def _accept_loop(listener: trio.abc.Listener[Any], router: Router,
                       nursery: trio.Nursery) -> None:
    while True:
        try:
            stream = await listener.accept()
        except OSError as exc:
            if exc.errno not in _ACCEPT_RETRY_ERRNOS:
                raise
            log.error("gRPC: failed accept; backing off", error=str(exc))
            await trio.sleep(0.1)
            continue
        nursery.start_soon(serve_connection, router, stream)


async def serve(
    routes: Mapping[str, Method],
    address: Path,
    *,
    tcp_address: str = "",
    uid: int = 0,
    gid: int = 0,
    max_recv: int = bridge.DEFAULT_MAX_RECV,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``routes`` until cancelled; the socket file is removed on the way out."""
    router = Router(routes, max_recv=max_recv)
    sock = _unix_listener(address, uid, gid)
    listeners: list[trio.SocketListener] = [
        trio.SocketListener(trio.socket.from_stdlib_socket(sock))]
    try:
        if tcp_address:
            host, _, port = tcp_address.rpartition(":")
            listeners += await trio.open_tcp_listeners(int(port), host=host or "127.0.0.1")
        async with trio.open_nursery() as nursery:
            for listener in listeners:
                nursery.start_soon(_accept_loop, listener, router, nursery)
            log.info("serving", address=str(address), tcp=tcp_address or None)
            task_status.started()
    finally:
        for listener in listeners[1:]:
            listener.socket.close()
        sock.close()
        with contextlib.suppress(FileNotFoundError):
            address.unlink()
