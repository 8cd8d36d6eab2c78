"""SPDY/3.1 codec (plugins/cri/streaming/spdy.py): byte layouts from the draft, no sockets."""

from __future__ import annotations

import struct
import zlib

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from berth.plugins.cri.streaming import spdy


def _pair() -> tuple[spdy.Connection, spdy.Connection]:
    return spdy.Connection(client=True), spdy.Connection(client=False)


def _deflate_block(raw: bytes) -> bytes:
    """A header block compressed the way any SPDY/3 peer does: zlib, the dictionary, sync flush."""
    z = zlib.compressobj(9, zlib.DEFLATED, 15, 8, zlib.Z_DEFAULT_STRATEGY, spdy.DICTIONARY)
    return z.compress(raw) + z.flush(zlib.Z_SYNC_FLUSH)


def _raw_block(pairs: list[tuple[bytes, bytes]]) -> bytes:
    out = struct.pack(">I", len(pairs))
    for n, v in pairs:
        out += struct.pack(">I", len(n)) + n + struct.pack(">I", len(v)) + v
    return out


def _syn_stream(sid: int, block: bytes, flags: int = 0) -> bytes:
    payload = struct.pack(">IIBB", sid, 0, 0, 0) + block
    return struct.pack(">HHI", 0x8003, 1, (flags << 24) | len(payload)) + payload


def test_dictionary_facts() -> None:
    # The draft's dictionary is 1423 bytes; its Adler-32 is the DICTID SPDY/3 peers send.
    assert len(spdy.DICTIONARY) == 1423
    assert zlib.adler32(spdy.DICTIONARY) == 0xE3C6A7C2
    assert spdy.DICTIONARY.startswith(b"\x00\x00\x00\x07options\x00\x00\x00\x04head")
    assert spdy.DICTIONARY.endswith(b",*,enq=0.")


def test_syn_stream_layout_and_independent_decode() -> None:
    c = spdy.Connection(client=True)
    sid = c.open_stream([("streamType", "stdout"), ("port", "80")], priority=2)
    out = c.data_to_send()
    assert sid == 1
    word1, word2 = struct.unpack_from(">II", out, 0)
    assert word1 == 0x80030001  # control bit, version 3, SYN_STREAM
    assert word2 >> 24 == 0 and word2 & 0xFFFFFF == len(out) - 8
    stream_id, assoc, pri = struct.unpack_from(">IIB", out, 8)
    assert (stream_id, assoc, pri >> 5) == (1, 0, 2)
    block = out[18:]
    # The zlib header names the SPDY dictionary by its Adler-32.
    assert block[2:6] == struct.pack(">I", 0xE3C6A7C2)
    raw = zlib.decompressobj(zdict=spdy.DICTIONARY).decompress(block)
    assert raw == _raw_block([(b"streamtype", b"stdout"), (b"port", b"80")])


def test_foreign_syn_stream_is_read() -> None:
    s = spdy.Connection(client=False)
    block = _deflate_block(_raw_block([(b"streamtype", b"error"), (b"x", b"a\0b")]))
    (ev,) = s.receive_data(_syn_stream(1, block, flags=spdy.FLAG_FIN))
    assert ev == spdy.StreamOpened(1, [("streamtype", "error"), ("x", "a"), ("x", "b")],
                                   fin=True)


def test_one_zlib_stream_per_direction() -> None:
    c, s = _pair()
    for i in range(5):
        c.open_stream([("streamtype", f"s{i}")])
    events = s.receive_data(c.data_to_send())
    assert [e.headers for e in events] == [[("streamtype", f"s{i}")] for i in range(5)]
    # Inflating a later block on its own fails: the blocks share one deflate history.
    c2 = spdy.Connection(client=True)
    c2.open_stream([("a", "b")])
    c2.data_to_send()
    c2.open_stream([("a", "b")])
    with pytest.raises(spdy.ProtocolError):
        spdy.Connection(client=False).receive_data(c2.data_to_send())


def test_reply_data_fin_and_frame_layout() -> None:
    c, s = _pair()
    sid = c.open_stream([("streamtype", "stdout")])
    s.receive_data(c.data_to_send())
    s.reply(sid)
    s.send_data(sid, b"hello", fin=True)
    out = s.data_to_send()
    reply_len = struct.unpack_from(">I", out, 4)[0] & 0xFFFFFF
    data = out[8 + reply_len:]
    assert struct.unpack_from(">II", data) == (1, (spdy.FLAG_FIN << 24) | 5)
    assert data[8:] == b"hello"
    events = c.receive_data(out)
    assert events == [spdy.StreamReplied(1, []), spdy.DataReceived(1, b"hello", fin=True)]


def test_big_data_frame_arrives_in_pieces_never_whole() -> None:
    c, s = _pair()
    sid = c.open_stream([])
    s.receive_data(c.data_to_send())
    s.send_data(sid, b"z" * 1_000_000)
    out = s.data_to_send()
    got = bytearray()
    for i in range(0, len(out), 4096):
        for ev in c.receive_data(out[i:i + 4096]):
            assert len(ev.data) <= 4096
            got += ev.data
    assert got == b"z" * 1_000_000


def test_half_close_both_ways_frees_the_stream() -> None:
    c, s = _pair()
    sid = c.open_stream([])
    s.receive_data(c.data_to_send())
    s.reply(sid)
    c.receive_data(s.data_to_send())
    c.end_stream(sid)
    assert s.receive_data(c.data_to_send()) == [spdy.DataReceived(sid, b"", fin=True)]
    assert s.stream_open(sid)
    s.end_stream(sid)
    assert not s.stream_open(sid)
    c.receive_data(s.data_to_send())
    assert not c.stream_open(sid)


def test_rst_ping_goaway_settings_window_update() -> None:
    c, s = _pair()
    sid = c.open_stream([])
    s.receive_data(c.data_to_send())
    pid = c.ping()
    assert pid == 1
    assert s.receive_data(c.data_to_send()) == [spdy.PingReceived(1)]
    assert c.receive_data(s.data_to_send()) == [spdy.PingAcknowledged(1)]
    s.update_settings({spdy.SETTINGS_INITIAL_WINDOW_SIZE: 1000})
    (ev,) = c.receive_data(s.data_to_send())
    assert ev == spdy.SettingsReceived({spdy.SETTINGS_INITIAL_WINDOW_SIZE: 1000})
    c.reset_stream(sid, spdy.CANCEL)
    assert s.receive_data(c.data_to_send()) == [spdy.StreamReset(sid, spdy.CANCEL)]
    s.goaway()
    out = s.data_to_send()
    assert out == struct.pack(">HHIII", 0x8003, 7, 8, 1, 0)
    assert c.receive_data(out) == [spdy.GoAwayReceived(1, 0)]
    with pytest.raises(spdy.ProtocolError):
        c.open_stream([])


def test_flow_control_enforced_once_peer_shows_it() -> None:
    c, s = _pair()
    sid = c.open_stream([])
    s.receive_data(c.data_to_send())
    # A peer that never sent WINDOW_UPDATE (Go's spdystream) is not held to 64 KiB.
    assert s.send_window(sid) == spdy.MAX_WINDOW
    s.send_data(sid, b"a" * 100_000)
    c.receive_data(s.data_to_send())
    c.acknowledge_received_data(sid, 100_000)
    events = s.receive_data(c.data_to_send())
    assert spdy.WindowUpdated(0, 100_000) in events and spdy.WindowUpdated(sid, 100_000) in events
    assert s.peer_flow_control
    # 64 KiB - 100000 + 100000 left on both windows.
    assert s.send_window(sid) == spdy.DEFAULT_WINDOW
    with pytest.raises(spdy.ProtocolError):
        s.send_data(sid, b"a" * (spdy.DEFAULT_WINDOW + 1))


def test_zip_bomb_header_block_fails_with_a_cap() -> None:
    s = spdy.Connection(client=False, max_header_bytes=64 * 1024)
    bomb = _deflate_block(_raw_block([(b"x", b"A" * 50_000_000)]))
    assert len(bomb) < 100_000
    with pytest.raises(spdy.HeaderBlockTooLarge):
        s.receive_data(_syn_stream(1, bomb))
    # The session is over and says so.
    assert s.closed
    assert s.data_to_send() == struct.pack(">HHIII", 0x8003, 7, 8, 1, 1)[:8] + struct.pack(
        ">II", 0, 1)


def test_header_block_that_does_not_inflate() -> None:
    s = spdy.Connection(client=False)
    with pytest.raises(spdy.HeaderBlockError):
        s.receive_data(_syn_stream(1, b"\x78\xbb" + b"\xff" * 40))


def test_header_block_lies() -> None:
    for raw in (struct.pack(">I", 1_000_000), struct.pack(">II", 1, 99),
                _raw_block([(b"Upper", b"x")]), _raw_block([(b"", b"x")]),
                _raw_block([(b"a", b"1"), (b"a", b"2")]), _raw_block([]) + b"junk"):
        with pytest.raises(spdy.HeaderBlockError):
            spdy.Connection(client=False).receive_data(_syn_stream(1, _deflate_block(raw)))


def test_huge_control_frame_refused_at_its_header() -> None:
    s = spdy.Connection(client=False)
    with pytest.raises(spdy.FrameTooLarge):
        s.receive_data(struct.pack(">HHI", 0x8003, 1, 0xFFFFFF))


def test_bad_version_and_bad_stream_ids() -> None:
    with pytest.raises(spdy.ProtocolError):
        spdy.Connection(client=False).receive_data(struct.pack(">HHI", 0x8002, 6, 4) + b"\0" * 4)
    block = _deflate_block(_raw_block([]))
    with pytest.raises(spdy.ProtocolError):  # even id from a client
        spdy.Connection(client=False).receive_data(_syn_stream(2, block))
    s = spdy.Connection(client=False)
    z = zlib.compressobj(9, zlib.DEFLATED, 15, 8, zlib.Z_DEFAULT_STRATEGY, spdy.DICTIONARY)
    b1 = z.compress(_raw_block([])) + z.flush(zlib.Z_SYNC_FLUSH)
    b2 = z.compress(_raw_block([])) + z.flush(zlib.Z_SYNC_FLUSH)
    s.receive_data(_syn_stream(5, b1))
    with pytest.raises(spdy.ProtocolError):  # ids must grow
        s.receive_data(_syn_stream(3, b2))
    with pytest.raises(spdy.ProtocolError):  # data on a stream never opened
        spdy.Connection(client=False).receive_data(struct.pack(">II", 7, 1) + b"x")


def test_unknown_control_frame_ignored() -> None:
    s = spdy.Connection(client=False)
    assert s.receive_data(struct.pack(">HHI", 0x8003, 10, 3) + b"abc") == []


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.binary(max_size=300), max_size=8))
def test_fuzz_decoder_only_raises_protocol_error(chunks: list[bytes]) -> None:
    s = spdy.Connection(client=False)
    try:
        for chunk in chunks:
            s.receive_data(chunk)
    except spdy.ProtocolError:
        pass


def _valid_session_bytes() -> bytes:
    c = spdy.Connection(client=True)
    a = c.open_stream([("streamtype", "error")])
    b = c.open_stream([("streamtype", "stdin"), ("port", "8080")])
    c.send_data(b, b"input" * 50)
    c.ping()
    c.end_stream(b)
    c.reset_stream(a)
    c.update_settings({4: 100})
    return c.data_to_send()


_SESSION = _valid_session_bytes()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, len(_SESSION) - 1), st.binary(min_size=1, max_size=8),
       st.integers(1, 64))
def test_fuzz_mutated_session(pos: int, patch: bytes, step: int) -> None:
    data = _SESSION[:pos] + patch + _SESSION[pos + len(patch):]
    s = spdy.Connection(client=False, max_header_bytes=4096)
    try:
        for i in range(0, len(data), step):
            s.receive_data(data[i:i + step])
    except spdy.ProtocolError:
        assert s.closed


def test_valid_session_in_any_chunking() -> None:
    ref = spdy.Connection(client=False).receive_data(_SESSION)
    for step in (1, 3, 7, 100):
        s = spdy.Connection(client=False)
        got: list[spdy.Event] = []
        for i in range(0, len(_SESSION), step):
            got += s.receive_data(_SESSION[i:i + step])
        merged: list[spdy.Event] = []
        for ev in got:
            if (isinstance(ev, spdy.DataReceived) and merged
                    and isinstance(merged[-1], spdy.DataReceived)
                    and merged[-1].stream_id == ev.stream_id and not merged[-1].fin):
                merged[-1] = spdy.DataReceived(ev.stream_id, merged[-1].data + ev.data, ev.fin)
            else:
                merged.append(ev)
        assert merged == ref

