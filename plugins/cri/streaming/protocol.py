"""The Kubernetes stream protocols above the transport, sans-io.

Facts from k8s.io/apimachinery (util/httpstream, util/remotecommand) and the kubelet's CRI
streaming server:

* SPDY upgrade: the request carries ``Connection: Upgrade``, ``Upgrade: SPDY/3.1`` and one
  ``X-Stream-Protocol-Version`` header per protocol the client speaks; the server answers
  ``101 Switching Protocols`` naming the one it chose, or ``403`` with
  ``X-Accepted-Stream-Protocol-Versions`` when none is common.
* remotecommand (exec, attach): the client opens one SPDY stream per ``streamType``
  (``error``, ``stdin``, ``stdout``, ``stderr``, ``resize``); the server replies to each and
  starts once all it expects are there. From ``v4.channel.k8s.io`` on, the error stream
  carries a JSON ``metav1.Status``; a non-zero exit is reason ``NonZeroExitCode`` with a cause
  of type ``ExitCode`` whose message is the code. The resize stream is a sequence of JSON
  ``{"Width": w, "Height": h}`` objects.
* port-forward (``portforward.k8s.io``): per forwarded connection the client opens a
  ``data`` and an ``error`` stream, both with ``port`` and ``requestID`` headers.
* WebSocket: the subprotocol says the framing. Binary protocols (``channel.k8s.io``,
  ``v4.channel.k8s.io``, ``v5.channel.k8s.io``) put the channel number in a message's first
  byte; the base64 ones (``base64.channel.k8s.io``, ``v4.base64.channel.k8s.io``) send text
  messages whose first character is the channel digit and the rest base64. v5 adds a close
  signal: a message ``[255, channel]`` half-closes that channel. Port-forward over WebSocket
  uses two channels per ``port`` query parameter (data ``2i``, error ``2i+1``), and the
  server's first message on each names the port as a little-endian uint16.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

SPDY_UPGRADE = "SPDY/3.1"
HEADER_PROTOCOL_VERSION = "X-Stream-Protocol-Version"
HEADER_ACCEPTED_VERSIONS = "X-Accepted-Stream-Protocol-Versions"

STREAM_PROTOCOL_V4 = "v4.channel.k8s.io"
STREAM_PROTOCOL_V3 = "v3.channel.k8s.io"
STREAM_PROTOCOL_V2 = "v2.channel.k8s.io"
STREAM_PROTOCOL_V1 = "channel.k8s.io"
# Newest first: the server picks the first of its own it shares with the client.
REMOTECOMMAND_PROTOCOLS = (STREAM_PROTOCOL_V4, STREAM_PROTOCOL_V3, STREAM_PROTOCOL_V2,
                           STREAM_PROTOCOL_V1)
PORTFORWARD_PROTOCOL = "portforward.k8s.io"
PORTFORWARD_PROTOCOLS = (PORTFORWARD_PROTOCOL,)

STREAM_TYPE = "streamtype"
STREAM_ERROR = "error"
STREAM_STDIN = "stdin"
STREAM_STDOUT = "stdout"
STREAM_STDERR = "stderr"
STREAM_RESIZE = "resize"
STREAM_DATA = "data"
PORT_HEADER = "port"
REQUEST_ID_HEADER = "requestid"

NON_ZERO_EXIT_CODE_REASON = "NonZeroExitCode"
EXIT_CODE_CAUSE = "ExitCode"

WS_V5 = "v5.channel.k8s.io"
WS_V4 = "v4.channel.k8s.io"
WS_V4_BASE64 = "v4.base64.channel.k8s.io"
WS_V1 = "channel.k8s.io"
WS_V1_BASE64 = "base64.channel.k8s.io"
WS_REMOTECOMMAND_PROTOCOLS = (WS_V5, WS_V4, WS_V4_BASE64, WS_V1, WS_V1_BASE64)
WS_PORTFORWARD_PROTOCOLS = (WS_V4, WS_V4_BASE64, "portforward.k8s.io")
WS_CLOSE_CHANNEL = 255

CH_STDIN, CH_STDOUT, CH_STDERR, CH_ERROR, CH_RESIZE = range(5)

MAX_RESIZE_BUFFER = 4096


class StreamProtocolError(Exception):
    """The peer broke the stream protocol (not the transport)."""


def negotiate(client: Iterable[str], server: Sequence[str]) -> str | None:
    """The server's most preferred protocol the client offers; None when none is common.

    A header may list several comma-separated protocols.
    """
    offered = {p.strip() for value in client for p in value.split(",") if p.strip()}
    for proto in server:
        if proto in offered:
            return proto
    return None


@dataclass(frozen=True)
class StreamOptions:
    """Which streams an exec or attach has (from the CRI request it was issued for)."""

    stdin: bool
    stdout: bool
    stderr: bool
    tty: bool

    def __post_init__(self) -> None:
        # A terminal merges stderr into stdout: there is no stderr stream with a tty.
        if self.tty and self.stderr:
            object.__setattr__(self, "stderr", False)

    def expected_spdy_streams(self, protocol: str) -> int:
        n = 1 + self.stdin + self.stdout + self.stderr
        if self.tty and protocol in (STREAM_PROTOCOL_V4, STREAM_PROTOCOL_V3):
            n += 1
        return n


def success_status() -> dict:
    return {"metadata": {}, "status": "Success"}


def exit_status(cmd: Sequence[str], code: int) -> dict:
    return {
        "metadata": {},
        "status": "Failure",
        "message": ("command terminated with non-zero exit code: error executing command "
                    f"{list(cmd)}, exit code {code}"),
        "reason": NON_ZERO_EXIT_CODE_REASON,
        "details": {"causes": [{"reason": EXIT_CODE_CAUSE, "message": str(code)}]},
    }


def internal_error_status(message: str) -> dict:
    return {
        "metadata": {},
        "status": "Failure",
        "message": f"Internal error occurred: {message}",
        "reason": "InternalError",
        "details": {"causes": [{"message": message}]},
        "code": 500,
    }


def encode_status(status: dict, protocol: str) -> bytes:
    """The error stream's payload: JSON from v4 on; before, only a failure's text."""
    if protocol in (STREAM_PROTOCOL_V4, WS_V4, WS_V4_BASE64, WS_V5):
        return json.dumps(status, separators=(",", ":")).encode()
    if status.get("status") == "Success":
        return b""
    return str(status.get("message", "")).encode()


def exit_code_of(status: dict) -> int:
    """The exit code a v4 status reports (0 for success); raises for other failures."""
    if status.get("status") == "Success":
        return 0
    if status.get("reason") == NON_ZERO_EXIT_CODE_REASON:
        for cause in (status.get("details") or {}).get("causes") or []:
            if cause.get("reason") == EXIT_CODE_CAUSE:
                return int(cause["message"])
    raise StreamProtocolError(f"remote command failed: {status.get('message')}")


@dataclass(frozen=True)
class TerminalSize:
    width: int
    height: int


class ResizeDecoder:
    """A sequence of JSON objects on the resize stream, bounded: a runaway object is an error.

    Field names match case-insensitively (Go's encoding/json does); sizes are uint16.
    """

    def __init__(self, limit: int = MAX_RESIZE_BUFFER) -> None:
        self._buf = ""
        self._limit = limit
        self._json = json.JSONDecoder()

    def feed(self, data: bytes) -> list[TerminalSize]:
        try:
            self._buf += data.decode("utf-8")
        except UnicodeDecodeError:
            raise StreamProtocolError("resize stream is not UTF-8") from None
        out: list[TerminalSize] = []
        while True:
            text = self._buf.lstrip()
            if not text:
                self._buf = ""
                break
            try:
                obj, end = self._json.raw_decode(text)
            except json.JSONDecodeError:
                self._buf = text
                if len(text) > self._limit:
                    raise StreamProtocolError("resize event too long or not JSON") from None
                break
            self._buf = text[end:]
            out.append(_terminal_size(obj))
        return out


def _terminal_size(obj: object) -> TerminalSize:
    if not isinstance(obj, dict):
        raise StreamProtocolError("resize event is not a JSON object")
    fields = {str(k).lower(): v for k, v in obj.items()}
    w, h = fields.get("width", 0), fields.get("height", 0)
    if not (isinstance(w, int) and isinstance(h, int)) or isinstance(w, bool) or isinstance(
            h, bool) or not (0 <= w <= 0xFFFF and 0 <= h <= 0xFFFF):
        raise StreamProtocolError("resize width/height must be uint16")
    return TerminalSize(w, h)


def encode_resize(size: TerminalSize) -> bytes:
    return json.dumps({"Width": size.width, "Height": size.height}).encode()


def parse_port(value: str) -> int:
    try:
        port = int(value, 10)
    except ValueError:
        raise StreamProtocolError(f"unable to parse {value!r} as a port") from None
    if not 1 <= port <= 0xFFFF or not value.isdigit():
        raise StreamProtocolError(f"port {value!r} must be between 1 and 65535")
    return port


# WebSocket channel framing ------------------------------------------------------------------


def ws_is_base64(protocol: str) -> bool:
    return "base64" in protocol


def ws_encode(protocol: str, channel: int, data: bytes) -> bytes | str:
    """One message: bytes for binary protocols, str for the base64 ones."""
    if ws_is_base64(protocol):
        return chr(ord("0") + channel) + base64.b64encode(data).decode()
    return bytes([channel]) + data


def ws_decode(protocol: str, message: bytes | str) -> tuple[int, bytes]:
    """(channel, payload) of one message; ``(255, bytes([ch]))`` is v5's close signal."""
    if ws_is_base64(protocol):
        if not isinstance(message, str) or not message:
            raise StreamProtocolError("base64 channel protocol needs non-empty text messages")
        ch = ord(message[0]) - ord("0")
        if not 0 <= ch <= 9:
            raise StreamProtocolError("base64 channel message without a channel digit")
        try:
            return ch, base64.b64decode(message[1:], validate=True)
        except ValueError:
            raise StreamProtocolError("invalid base64 in channel message") from None
    if isinstance(message, str):
        message = message.encode()
    if not message:
        raise StreamProtocolError("empty channel message")
    return message[0], bytes(message[1:])


def ws_port_prefix(port: int) -> bytes:
    return port.to_bytes(2, "little")
