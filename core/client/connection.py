"""The gRPC connection a command uses, with the namespace header containerd expects."""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass

from grpclib.client import Channel

DEFAULT_ADDRESS = "/run/berth/berth.sock"
DEFAULT_NAMESPACE = "default"


@dataclass
class Session:
    channel: Channel
    namespace: str

    @property
    def metadata(self) -> dict[str, str]:
        return {"containerd-namespace": self.namespace}


def default_address() -> str:
    return os.environ.get("BERTH_ADDRESS") or os.environ.get("CONTAINERD_ADDRESS") \
        or DEFAULT_ADDRESS


def default_namespace() -> str:
    return os.environ.get("BERTH_NAMESPACE") or os.environ.get("CONTAINERD_NAMESPACE") \
        or DEFAULT_NAMESPACE


@contextlib.asynccontextmanager
async def connect(address: str, namespace: str) -> AsyncIterator[Session]:
    path = address.removeprefix("unix://")
    channel = Channel(path=path)
    try:
        yield Session(channel, namespace)
    finally:
        channel.close()
