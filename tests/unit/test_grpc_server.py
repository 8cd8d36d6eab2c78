"""berth's gRPC server (core/grpc/connection.py) through raw HTTP/2, in process."""

from __future__ import annotations

import h2.events
import pytest
import structlog
import trio
import trio.testing

from berth.core.grpc.connection import FrameGate, Refused
from berth.core.grpc.server import serve_connection
from tests.fuzz import harness


async def call(rt: object, path: bytes, namespace: bytes = b"default",
               body: bytes = b"\x00\x00\x00\x00\x00") -> dict[bytes, bytes]:
    """One call; the headers and trailers it got, merged."""
    conn = harness.client_h2()
    conn.send_headers(1, [
        (b":method", b"POST"), (b":scheme", b"http"), (b":path", path),
        (b":authority", b"x"), (b"content-type", b"application/grpc"), (b"te", b"trailers"),
        (b"containerd-namespace", namespace)])
    conn.send_data(1, body, end_stream=True)
    client, server = trio.testing.memory_stream_pair()
    got: dict[bytes, bytes] = {}
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve_connection, rt, server)
            await client.send_all(conn.data_to_send())
            ended = False
            while not ended:
                data = await client.receive_some(1 << 16)
                assert data
                for ev in conn.receive_data(data):
                    if isinstance(ev, (h2.events.ResponseReceived, h2.events.TrailersReceived)):
                        got.update(ev.headers)
                    ended = ended or isinstance(ev, h2.events.StreamEnded)
            await client.aclose()
    return got


async def test_unknown_paths_are_logged_once_each_and_answered() -> None:
    rt = harness.router()
    paths = [b"/grpc.health.v1.Health/Check", b"/grpc.health.v1.Health/Check",
             b"/containerd.services.version.v1.Version/Nope"]
    with structlog.testing.capture_logs() as logs:
        answers = [await call(rt, p) for p in paths]
    for got in answers:
        assert got[b"grpc-status"] == b"12" and got[b"content-type"].startswith(
            b"application/grpc"), got
    assert answers[0][b"grpc-message"] == b"unknown service grpc.health.v1.Health"
    assert answers[2][b"grpc-message"] == (
        b"unknown method Nope for service containerd.services.version.v1.Version")
    warned = [e for e in logs if e["event"] == "unknown gRPC path"]
    assert [e["path"] for e in warned] == ["/grpc.health.v1.Health/Check",
                                           "/containerd.services.version.v1.Version/Nope"]
    assert all(e["log_level"] == "warning" for e in warned)


@pytest.mark.parametrize("namespace,message", [
    ("é".encode(), "namespace validation: identifier \"é\" must match"),
    (b"\xff\xfe", "namespace validation: identifier"),
])
async def test_namespace_header_of_any_bytes_gets_invalid_argument(
        namespace: bytes, message: str) -> None:
    got = await call(harness.router(), harness.VERSION.encode(), namespace)
    assert got[b"grpc-status"] == b"3", got
    text = got[b"grpc-message"].decode()
    assert message.replace("é", "%C3%A9") in text, text


async def test_malformed_request_is_internal_error_unmarshalling() -> None:
    got = await call(harness.router(), harness.VERSION.encode(),
                     body=b"\x00\x00\x00\x00\x02\x0a\xff")
    assert got[b"grpc-status"] == b"13"
    assert got[b"grpc-message"].startswith(b"grpc: error unmarshalling request")


def test_frame_gate() -> None:
    preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
    gate = FrameGate()
    gate.feed(preface[:10], 16384)
    gate.feed(preface[10:] + b"\x00\x00\x06\x04", 16384)  # a split SETTINGS header
    assert not gate.ready
    gate.feed(b"\x00\x00\x00\x00\x00" + bytes(6), 16384)
    assert gate.ready
    gate.feed(b"\x00\x40\x00\x00\x00\x00\x00\x00\x01" + bytes(100), 16384)  # 16 KiB DATA
    with pytest.raises(Refused):
        gate.feed(bytes(16384 - 100) + b"\x00\x40\x01\x00\x00\x00\x00\x00\x01", 16384)
    with pytest.raises(Refused):
        FrameGate().feed(preface + b"\x00\x00\x08\x06\x00\x00\x00\x00\x00", 16384)  # PING
