"""The gRPC connection a client uses, with the namespace header containerd expects.

grpclib connects on the first call; :attr:`Session.connected` tells whether one call
reached the daemon, so that a socket error can be read as "not there" (never connected)
or "went away" (connected before).
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass

from grpclib.client import Channel
from grpclib.events import SendRequest, listen

DEFAULT_ADDRESS = "/run/berth/berth.sock"
DEFAULT_NAMESPACE = "default"
NAMESPACE_HEADER = "containerd-namespace"
# How long :func:`probe` waits for the socket's accept: a local daemon answers at once.
PROBE_TIMEOUT = 2.0


@dataclass
class Session:
    channel: Channel
    namespace: str
    connected: bool = False  # a request has been sent over an open connection

    @property
    def metadata(self) -> dict[str, str]:
        return {NAMESPACE_HEADER: self.namespace}


def default_address() -> str:
    return os.environ.get("BERTH_ADDRESS") or os.environ.get("CONTAINERD_ADDRESS") \
        or DEFAULT_ADDRESS


def default_namespace() -> str:
    return os.environ.get("BERTH_NAMESPACE") or os.environ.get("CONTAINERD_NAMESPACE") \
        or DEFAULT_NAMESPACE


def socket_path(address: str) -> str:
    return address.removeprefix("unix://")


@contextlib.asynccontextmanager
async def connect(address: str, namespace: str) -> AsyncIterator[Session]:
    channel = Channel(path=socket_path(address))
    session = Session(channel, namespace)

    async def sent(_: SendRequest) -> None:
        # grpclib dispatches SendRequest only once the connection is open.
        session.connected = True

    listen(channel, SendRequest, sent)
    try:
        yield session
    finally:
        channel.close()


def probe(address: str) -> OSError | None:
    """Blocking: None if something accepts on the daemon's socket, else the error."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(PROBE_TIMEOUT)
    try:
        s.connect(socket_path(address))
    except OSError as e:
        return e
    finally:
        s.close()
    return None
