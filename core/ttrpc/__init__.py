"""ttrpc, containerd's lightweight RPC for shims: sans-io codec, trio client and server."""

from berth.core.ttrpc.client import Client, open_client, open_stream_client
from berth.core.ttrpc.codec import (
    MAX_MESSAGE_LENGTH,
    FrameTooLarge,
    MessageDecodeError,
    ProtocolError,
    TruncatedFrame,
)
from berth.core.ttrpc.server import NAMESPACE_KEY, Context, Method, PeerCredentials, Server

__all__ = [
    "MAX_MESSAGE_LENGTH",
    "NAMESPACE_KEY",
    "Client",
    "Context",
    "FrameTooLarge",
    "MessageDecodeError",
    "Method",
    "PeerCredentials",
    "ProtocolError",
    "Server",
    "TruncatedFrame",
    "open_client",
    "open_stream_client",
]
