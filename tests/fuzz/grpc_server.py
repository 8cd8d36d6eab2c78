"""Fuzz berthd's gRPC server: HTTP/2 frames with any contents, header names and values of
any bytes, gRPC length prefixes and messages. After each example the server must have
closed or answered that connection (no hang, no exception past a boundary) and must
answer a well-formed call on a new connection.

    python -m tests.fuzz.grpc_server --hours 2
"""

from __future__ import annotations

import struct
import sys

import hpack
import trio
from hypothesis import given, strategies as st

from tests.fuzz import harness

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
SETTINGS = b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
PATHS = [
    harness.VERSION.encode(),
    b"/containerd.services.content.v1.Content/Info",
    b"/containerd.services.content.v1.Content/Read",
    b"/containerd.services.content.v1.Content/Write",
    b"/containerd.services.content.v1.Content/Delete",  # not implemented by the stand-in
    b"/grpc.health.v1.Health/Check",  # unknown here
]
BOUNDARY_EVENTS = ("gRPC connection failed", "unhandled error in service")

ROUTER = harness.router()


def frame(ftype: int, flags: int, sid: int, payload: bytes) -> bytes:
    return (len(payload).to_bytes(3, "big") + bytes([ftype, flags])
            + struct.pack(">I", sid) + payload)


def check(data: bytes, chunks: int = 1) -> None:
    async def run() -> None:
        with harness.no_bugs(*BOUNDARY_EVENTS):
            await harness.exchange(ROUTER, data, chunks=chunks)
        await harness.good_call(ROUTER)
    trio.run(run)


stream_ids = st.sampled_from([0, 1, 2, 3, 5, 7, 2**31 - 1]) | st.integers(0, 2**32 - 1)
frames = st.builds(
    frame,
    ftype=st.integers(0, 10) | st.integers(0, 255),
    flags=st.sampled_from([0, 1, 4, 5, 8, 0x20, 0x25]) | st.integers(0, 255),
    sid=stream_ids,
    payload=st.binary(max_size=256),
)
header_names = st.sampled_from([
    b":method", b":path", b":scheme", b":authority", b"content-type", b"te",
    b"grpc-timeout", b"containerd-namespace", b"containerd-lease", b"x-bin",
    b"grpc-encoding", b"user-agent",
]) | st.binary(max_size=20)
header_values = st.sampled_from([
    b"POST", b"GET", b"application/grpc", b"application/grpc+proto", b"trailers",
    b"1S", b"0n", b"99999999H", b"100000000S", b"default", "é".encode(), b"\xff\xfe",
]) | st.sampled_from(PATHS) | st.binary(max_size=40)


@st.composite
def grpc_calls(draw: st.DrawFn) -> bytes:
    """One call on stream 1: headers (mostly sensible, any bytes), then gRPC data."""
    headers = []
    if draw(st.booleans()):
        headers += [(b":method", b"POST"), (b":scheme", b"http"),
                    (b":path", draw(st.sampled_from(PATHS) | st.binary(max_size=40))),
                    (b":authority", b"x"), (b"content-type", b"application/grpc"),
                    (b"te", b"trailers")]
    headers += draw(st.lists(st.tuples(header_names, header_values), max_size=6))
    block = hpack.Encoder().encode(draw(st.permutations(headers)))
    ended = draw(st.booleans())
    out = PREFACE + SETTINGS + frame(0x1, 0x4, 1, block)
    message = draw(st.binary(max_size=300))
    length = draw(st.sampled_from([len(message)]) | st.integers(0, 2**32 - 1))
    body = bytes([draw(st.sampled_from([0, 1]) | st.integers(0, 255))]) \
        + length.to_bytes(4, "big") + message
    cut = draw(st.integers(0, len(body)))
    out += frame(0x0, 0, 1, body[:cut])
    out += frame(0x0, 0x1 if ended else 0, 1, body[cut:])
    out += b"".join(draw(st.lists(frames, max_size=3)))
    return out


@given(st.binary(max_size=4096), st.booleans(), st.integers(1, 8))
def fuzz_raw_bytes(data: bytes, preface: bool, chunks: int) -> None:
    check((PREFACE + SETTINGS if preface else b"") + data, chunks)


@given(st.lists(frames, max_size=16), st.integers(1, 8))
def fuzz_frames(fs: list[bytes], chunks: int) -> None:
    check(PREFACE + SETTINGS + b"".join(fs), chunks)


@given(grpc_calls(), st.integers(1, 4))
def fuzz_grpc_calls(data: bytes, chunks: int) -> None:
    check(data, chunks)


PROPERTIES = [fuzz_raw_bytes, fuzz_frames, fuzz_grpc_calls]

if __name__ == "__main__":
    sys.exit(harness.run_long("grpc_server", PROPERTIES))
