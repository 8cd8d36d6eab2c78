"""berth's gRPC server (core/grpc/connection.py) through raw HTTP/2, in process."""

from __future__ import annotations

import h2.events
import pytest
import structlog
import trio
import trio.testing

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
    # A path of undecodable bytes: answered the same way, logged escaped (printable).
    with structlog.testing.capture_logs() as logs:
        got = await call(rt, b"/bad\xff.Svc/M")
    assert got[b"grpc-status"] == b"12"
    assert got[b"grpc-message"] == b"unknown service bad%FF.Svc"
    assert [e["path"] for e in logs if e["event"] == "unknown gRPC path"] == ["/bad\\xff.Svc/M"]


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


def test_handshake_oversized_frames_and_a_first_frame_not_settings() -> None:
    """nghttp2 judges frames from their 9-byte header: one longer than the advertised
    SETTINGS_MAX_FRAME_SIZE ends the connection (FRAME_SIZE_ERROR), as does a first frame
    after the preface that is not SETTINGS (PROTOCOL_ERROR). The handshake counts as
    done (the timer stops) once the client's SETTINGS is in, however the bytes are cut."""
    from berth.core.grpc.connection import Connection
    preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
    conn = Connection(harness.router())
    assert conn.feed(preface[:10])
    assert conn.feed(preface[10:] + b"\x00\x00\x06\x04")  # a split SETTINGS header
    assert not conn.ready
    assert conn.feed(b"\x00\x00\x00\x00\x00" + bytes(6))
    assert conn.ready
    conn.data_to_send()
    assert not conn.feed(b"\x00\x40\x01\x00\x00\x00\x00\x00\x01")  # 16 KiB + 1 DATA
    assert _goaway_code(conn.data_to_send()) == 0x6  # FRAME_SIZE_ERROR
    conn = Connection(harness.router())
    assert not conn.feed(preface + b"\x00\x00\x08\x06\x00\x00\x00\x00\x00" + bytes(8))
    assert _goaway_code(conn.data_to_send()) == 0x1  # PROTOCOL_ERROR


def _goaway_code(data: bytes) -> int | None:
    """The error code of the first GOAWAY among ``data``'s frames."""
    pos = 0
    while pos + 9 <= len(data):
        length = int.from_bytes(data[pos:pos + 3], "big")
        if data[pos + 3] == 0x07:
            return int.from_bytes(data[pos + 13:pos + 17], "big")
        pos += 9 + length
    return None


async def test_client_stream_larger_than_the_windows_flows() -> None:
    # Three 300 kB messages on a Write stream: the server hands the window back as its
    # service reads, so each message arrives whole (the stream window is 64 KiB).
    from berth.core.api.containerd.services.content import v1 as content

    rt = harness.router(max_recv=1 << 20)
    conn = harness.client_h2()
    conn.send_headers(1, [
        (b":method", b"POST"), (b":scheme", b"http"),
        (b":path", b"/containerd.services.content.v1.Content/Write"), (b":authority", b"x"),
        (b"content-type", b"application/grpc"), (b"te", b"trailers")])
    pending = bytearray()
    for _ in range(3):
        msg = bytes(content.WriteContentRequest(data=bytes(300_000)))
        pending += b"\x00" + len(msg).to_bytes(4, "big") + msg
    client, server = trio.testing.memory_stream_pair()
    offsets, status = [], None
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve_connection, rt, server)
            while status is None:
                n = min(len(pending), conn.local_flow_control_window(1),
                        conn.max_outbound_frame_size)
                if n:
                    conn.send_data(1, bytes(pending[:n]), end_stream=n == len(pending))
                    del pending[:n]
                await client.send_all(conn.data_to_send())
                if n and pending:
                    continue
                for ev in conn.receive_data(await client.receive_some(1 << 16)):
                    if isinstance(ev, h2.events.DataReceived):
                        conn.acknowledge_received_data(ev.flow_controlled_length, 1)
                        offsets.append(content.WriteContentResponse().parse(ev.data[5:]).offset)
                    elif isinstance(ev, h2.events.TrailersReceived):
                        status = dict(ev.headers)[b"grpc-status"]
                await client.send_all(conn.data_to_send())
            await client.aclose()
    assert status == b"0" and offsets == [300_000] * 3


async def test_malformed_timeout_is_an_error_not_a_crash() -> None:
    conn = harness.client_h2()
    conn.send_headers(1, [
        (b":method", b"POST"), (b":scheme", b"http"), (b":path", harness.VERSION.encode()),
        (b":authority", b"x"), (b"content-type", b"application/grpc"),
        (b"grpc-timeout", b"12x")], end_stream=True)
    got = await harness.exchange(harness.router(), conn.data_to_send())
    events = conn.receive_data(got)
    trailers = [dict(e.headers) for e in events if isinstance(e, h2.events.ResponseReceived)]
    assert trailers and trailers[0][b"grpc-status"] == b"13", events
    assert trailers[0][b"grpc-message"].startswith(b"transport: malformed grpc-timeout")


class _SlowSend(trio.abc.Stream):
    """A stream whose sends take (virtual) seconds: a client slow to take answers."""

    def __init__(self, inner: trio.abc.Stream) -> None:
        self.inner = inner

    async def send_all(self, data: bytes) -> None:  # type: ignore[override]
        await trio.sleep(2)
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        return await self.inner.receive_some(max_bytes)

    async def aclose(self) -> None:
        await self.inner.aclose()


async def test_handshake_deadline_never_cuts_an_answer(autojump_clock: object) -> None:
    # The handshake deadline (1 s) passes while the first answer is being sent: the
    # answer still arrives whole (the deadline only bounds the wait for bytes).
    conn = harness.client_h2()
    conn.send_headers(1, [
        (b":method", b"POST"), (b":scheme", b"http"), (b":path", harness.VERSION.encode()),
        (b":authority", b"x"), (b"content-type", b"application/grpc"),
        (b"containerd-namespace", b"default")])
    conn.send_data(1, b"\x00\x00\x00\x00\x00", end_stream=True)
    client, server = trio.testing.memory_stream_pair()
    status = None
    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve_connection, harness.router(), _SlowSend(server))
        await client.send_all(conn.data_to_send())
        with trio.fail_after(30):
            while status is None:
                data = await client.receive_some(1 << 16)
                assert data, "hung up"
                for ev in conn.receive_data(data):
                    if isinstance(ev, (h2.events.ResponseReceived, h2.events.TrailersReceived)):
                        status = dict(ev.headers).get(b"grpc-status", status)
        await client.aclose()
    assert status == b"0"


# -- PINGs (grpc-go sends one with nearly every call) -----------------------------------

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
SETTINGS = b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"


def ping(payload: bytes = b"12345678", flags: int = 0, stream: int = 0,
         length: int = 8) -> bytes:
    return (length.to_bytes(3, "big") + b"\x06" + bytes([flags]) + stream.to_bytes(4, "big")
            + payload[:length].ljust(length, b"\x00"))


def _connection_and_client():
    from berth.core.grpc.connection import Connection
    conn = Connection(harness.router())
    client = harness.client_h2()
    conn.feed(client.data_to_send())
    client.receive_data(conn.data_to_send())
    return conn, client


def test_pings_are_acked_with_their_payload_and_calls_still_answered() -> None:
    conn, client = _connection_and_client()
    client.ping(b"bdp-ping")
    client.send_headers(1, [
        (b":method", b"POST"), (b":scheme", b"http"), (b":path", harness.VERSION.encode()),
        (b":authority", b"x"), (b"content-type", b"application/grpc"), (b"te", b"trailers"),
        (b"containerd-namespace", b"default")])
    client.send_data(1, b"\x00\x00\x00\x00\x00", end_stream=True)
    client.ping(b"second!!")
    assert conn.feed(client.data_to_send())
    events = client.receive_data(conn.data_to_send())
    acks = [ev.ping_data for ev in events if isinstance(ev, h2.events.PingAckReceived)]
    assert acks == [b"bdp-ping", b"second!!"]
    trailers = [dict(ev.headers) for ev in events if isinstance(ev, h2.events.TrailersReceived)]
    assert trailers == [{b"grpc-status": b"0"}]
    # A read holding nothing but a PING is answered too.
    client.ping(b"lonely!!")
    assert conn.feed(client.data_to_send())
    events = client.receive_data(conn.data_to_send())
    assert [ev.ping_data for ev in events] == [b"lonely!!"]


def test_ping_inside_a_header_block_still_fails_the_connection() -> None:
    conn, _ = _connection_and_client()
    headers_open = b"\x00\x00\x01\x01\x00\x00\x00\x00\x01" + b"\x82"
    assert not conn.feed(headers_open + ping())
    goaway = conn.data_to_send()
    assert _goaway_code(goaway) == 0x1  # PROTOCOL_ERROR
