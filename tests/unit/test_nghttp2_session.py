"""berthd's HTTP/2 session (core/grpc/nghttp2.py) against h2 as the client, no sockets."""

from __future__ import annotations

import h2.config
import h2.connection
import h2.events
import h2.settings
import pytest
from hypothesis import given, settings, strategies as st

from berth.core.grpc import nghttp2
from berth.core.grpc.nghttp2 import ErrorCode, ServerSession, SessionError

REQUEST = [(b":method", b"POST"), (b":scheme", b"http"), (b":path", b"/a.B/C"),
           (b":authority", b"x"), (b"content-type", b"application/grpc"),
           (b"te", b"trailers")]


def _pair(window: int = 65535) -> tuple[ServerSession, h2.connection.H2Connection]:
    server = ServerSession(connection_window=1 << 20)
    client = h2.connection.H2Connection(h2.config.H2Configuration(
        client_side=True, header_encoding=None))
    client.initiate_connection()
    client.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: window})
    assert {e[0] for e in server.receive(client.data_to_send())} == {nghttp2.SETTINGS}
    client.receive_data(server.data_to_send())
    return server, client


def _exchange(server: ServerSession, client: h2.connection.H2Connection) -> list[object]:
    """Client bytes to the server, its answer back, until neither has more."""
    events: list[object] = []
    for _ in range(100):  # bounded: a few rounds drain any window here
        out = server.data_to_send()
        if not out:
            break
        for ev in client.receive_data(out):
            events.append(ev)
            if isinstance(ev, h2.events.DataReceived):
                client.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
        server.receive(client.data_to_send())
    return events


def test_the_library_is_the_pinned_one_or_newer() -> None:
    assert nghttp2.version() >= nghttp2.MIN_VERSION


def test_request_headers_data_and_end_arrive_as_events() -> None:
    server, client = _pair()
    client.send_headers(1, REQUEST)
    client.send_data(1, b"\x00\x00\x00\x00\x02hi", end_stream=True)
    events = server.receive(client.data_to_send())
    assert events == [(nghttp2.REQUEST, 1, REQUEST),
                      (nghttp2.DATA, 1, b"\x00\x00\x00\x00\x02hi"), (nghttp2.END, 1, None)]


def test_trailers_and_reset_wait_behind_data_the_window_holds_back() -> None:
    """gRPC's order on the wire: headers, every data byte, trailers, then the reset
    that tells a client still sending to stop (nghttp2 alone would send HEADERS and
    RST_STREAM ahead of DATA the peer's window holds back)."""
    server, client = _pair(window=1000)
    client.send_headers(1, REQUEST)
    server.receive(client.data_to_send())
    body = bytes(range(256)) * 40
    server.send_headers(1, [(b":status", b"200")])
    server.send_data(1, body)
    server.send_headers(1, [(b"grpc-status", b"0")], end_stream=True)
    server.reset_stream(1, ErrorCode.NO_ERROR)
    kinds, data = [], b""
    for ev in _exchange(server, client):
        if isinstance(ev, h2.events.DataReceived):
            data += ev.data
        kinds.append(type(ev).__name__)
    assert data == body
    order = [k for k in kinds if k != "DataReceived"]
    assert order[-3:] == ["TrailersReceived", "StreamEnded", "StreamReset"], kinds
    assert kinds.index("TrailersReceived") > max(
        i for i, k in enumerate(kinds) if k == "DataReceived")


def test_send_window_counts_what_is_queued() -> None:
    server, client = _pair(window=1000)
    client.send_headers(1, REQUEST)
    server.receive(client.data_to_send())
    assert server.send_window(1) == 1000
    server.send_data(1, b"x" * 600)
    assert server.send_window(1) == 400
    server.data_to_send()  # framed: the peer's window shrinks, the queue empties
    assert server.send_window(1) == 400


def test_a_header_block_interrupted_is_a_connection_error_with_goaway() -> None:
    server, _ = _pair()
    headers_open = b"\x00\x00\x01\x01\x00\x00\x00\x00\x01\x82"
    ping = b"\x00\x00\x08\x06\x00\x00\x00\x00\x0012345678"
    with pytest.raises(SessionError):
        server.receive(headers_open + ping)
    goaway = server.data_to_send()
    assert goaway[3] == 0x07 and goaway[13:17] == b"\x00\x00\x00\x01"


def test_oversized_header_list_resets_only_that_stream() -> None:
    server, client = _pair()
    client.send_headers(1, [*REQUEST, (b"x-big", b"v" * 70000)])
    client.send_headers(3, REQUEST, end_stream=True)
    events = server.receive(client.data_to_send())
    assert (nghttp2.REQUEST, 3, REQUEST) in events
    assert not any(e[0] == nghttp2.REQUEST and e[1] == 1 for e in events)
    resets = [ev for ev in client.receive_data(server.data_to_send())
              if isinstance(ev, h2.events.StreamReset)]
    assert [r.stream_id for r in resets] == [1]


def test_a_closed_session_refuses_calls() -> None:
    server, _ = _pair()
    server.close()
    assert server.data_to_send() == b""
    with pytest.raises(SessionError):
        server.receive(b"\x00")
    with pytest.raises(SessionError):
        server.send_data(1, b"x")


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=64), max_size=8))
def test_any_bytes_after_the_handshake_give_events_or_session_error(
        chunks: list[bytes]) -> None:
    """Whatever a client sends: events, or SessionError with a GOAWAY to send; never
    another exception, and the session still frames its output."""
    server, _ = _pair()
    for chunk in chunks:
        try:
            for kind, sid, _ in server.receive(chunk):
                assert kind in range(1, 9) and sid >= 0
        except SessionError:
            break
        finally:
            server.data_to_send()


def test_a_failing_callback_ends_the_session_with_its_error() -> None:
    """An exception in a callback never returns into C as if nothing happened: the
    session stops and receive() raises it (the connection's boundary logs it)."""

    class Exploding(list):  # type: ignore[type-arg]
        def append(self, item: object) -> None:
            raise RuntimeError("bad header handling")

    class Broken(ServerSession):
        def _on_begin_headers(self, *args: object) -> int:  # type: ignore[override]
            rv = super()._on_begin_headers(*args)  # type: ignore[arg-type]
            self._headers = Exploding()  # the real _on_header's append fails
            return rv

    server = Broken(connection_window=1 << 20)
    client = h2.connection.H2Connection(h2.config.H2Configuration(
        client_side=True, header_encoding=None))
    client.initiate_connection()
    server.receive(client.data_to_send())
    client.send_headers(1, REQUEST, end_stream=True)
    with pytest.raises(RuntimeError, match="bad header handling"):
        server.receive(client.data_to_send())


def test_a_header_block_serves_every_answer_it_is_sent_with() -> None:
    """One prepared array for many sends: nghttp2 copies what it points to."""
    server, client = _pair()
    ok = nghttp2.HeaderBlock([(b":status", b"200"), (b"content-type", b"application/grpc")])
    done = nghttp2.HeaderBlock([(b"grpc-status", b"0")])
    for sid in (1, 3, 5):
        client.send_headers(sid, REQUEST, end_stream=True)
    server.receive(client.data_to_send())
    for sid in (1, 3, 5):
        server.reply(sid, ok, b"\x00\x00\x00\x00\x00", done)
    got = {}
    for ev in _exchange(server, client):
        if isinstance(ev, (h2.events.ResponseReceived, h2.events.TrailersReceived)):
            got.setdefault(ev.stream_id, []).append(ev.headers)
    assert got == {sid: [list(ok), list(done)] for sid in (1, 3, 5)}
