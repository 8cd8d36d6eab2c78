"""A gRPC server on a unix socket (and optionally TCP), owned by a trio task."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from pathlib import Path
from typing import Any

import grpclib.const
import grpclib.exceptions
import grpclib.server
import structlog
import trio
import trio_asyncio

from berth.core.grpc.bridge import Server

log = structlog.get_logger("grpc")


class _QuietPeerResets(logging.Filter):
    """grpclib logs a traceback when a client resets a stream it was still answering
    (ctr does so after every content Write); that is the client's right, not an error."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not (record.getMessage().startswith("Failed to handle cancellation")
                    and isinstance(exc, grpclib.exceptions.StreamTerminatedError))


logging.getLogger("grpclib.server").addFilter(_QuietPeerResets())


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


async def serve(
    routes: dict[str, grpclib.const.Handler],
    address: Path,
    *,
    tcp_address: str = "",
    uid: int = 0,
    gid: int = 0,
    task_status: Any = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``routes`` until cancelled; the socket file is removed on the way out.

    Must run inside ``trio_asyncio.open_loop()``.
    """
    sock = _unix_listener(address, uid, gid)
    servers: list[grpclib.server.Server] = []
    # Async unary methods run here, as trio tasks (see bridge.Protocol); cancelling
    # serve cancels them with everything else.
    async with trio.open_nursery() as calls:
        try:
            server = Server(routes, calls=calls)
            servers.append(server)
            await trio_asyncio.aio_as_trio(server.start)(sock=sock)
            if tcp_address:
                host, _, port = tcp_address.rpartition(":")
                tcp = Server(routes, calls=calls)
                servers.append(tcp)
                await trio_asyncio.aio_as_trio(tcp.start)(host or "127.0.0.1", int(port))
            log.info("serving", address=str(address), tcp=tcp_address or None)
            task_status.started()
            await trio.sleep_forever()
        finally:
            with trio.CancelScope(shield=True):
                for s in servers:
                    s.close()
                    with trio.move_on_after(5):
                        await trio_asyncio.aio_as_trio(s.wait_closed)()
                sock.close()
                with contextlib.suppress(FileNotFoundError):
                    address.unlink()
