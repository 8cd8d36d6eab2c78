"""k8s stream protocol pieces (plugins/cri/streaming/protocol.py), sans-io."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings, strategies as st

from berth.plugins.cri.streaming import protocol as p


def test_negotiate_prefers_the_servers_newest() -> None:
    assert p.negotiate(["channel.k8s.io", "v4.channel.k8s.io"],
                       p.REMOTECOMMAND_PROTOCOLS) == "v4.channel.k8s.io"
    assert p.negotiate(["v2.channel.k8s.io, v3.channel.k8s.io"],
                       p.REMOTECOMMAND_PROTOCOLS) == "v3.channel.k8s.io"
    assert p.negotiate(["v9"], p.REMOTECOMMAND_PROTOCOLS) is None


def test_status_json_shapes() -> None:
    s = p.exit_status(["sh", "-c", "exit 3"], 3)
    assert s["reason"] == "NonZeroExitCode"
    assert s["details"]["causes"] == [{"reason": "ExitCode", "message": "3"}]
    assert p.exit_code_of(json.loads(p.encode_status(s, p.STREAM_PROTOCOL_V4))) == 3
    assert p.encode_status(p.success_status(), p.STREAM_PROTOCOL_V4) == (
        b'{"metadata":{},"status":"Success"}')
    assert p.encode_status(p.success_status(), p.STREAM_PROTOCOL_V2) == b""
    assert b"exit code 3" in p.encode_status(s, p.STREAM_PROTOCOL_V3)
    with pytest.raises(p.StreamProtocolError):
        p.exit_code_of(p.internal_error_status("boom"))


def test_stream_options_tty_drops_stderr() -> None:
    o = p.StreamOptions(stdin=True, stdout=True, stderr=True, tty=True)
    assert not o.stderr
    assert o.expected_spdy_streams(p.STREAM_PROTOCOL_V4) == 4  # error, stdin, stdout, resize
    assert o.expected_spdy_streams(p.STREAM_PROTOCOL_V2) == 3


def test_resize_decoder_sequences_and_case() -> None:
    d = p.ResizeDecoder()
    assert d.feed(b'{"Width":80,"Hei') == []
    assert d.feed(b'ght":24}{"width":1,"height":2}\n') == [p.TerminalSize(80, 24),
                                                           p.TerminalSize(1, 2)]
    with pytest.raises(p.StreamProtocolError):
        p.ResizeDecoder().feed(b'{"Width":70000,"Height":1}')
    with pytest.raises(p.StreamProtocolError):
        p.ResizeDecoder(limit=100).feed(b'{"Width":' + b" " * 200)
    with pytest.raises(p.StreamProtocolError):
        p.ResizeDecoder().feed(b"[1,2]")


def test_ws_framing() -> None:
    assert p.ws_encode(p.WS_V5, 1, b"hi") == b"\x01hi"
    assert p.ws_encode(p.WS_V4_BASE64, 2, b"hi") == "2aGk="
    assert p.ws_decode(p.WS_V4_BASE64, "0aGk=") == (0, b"hi")
    assert p.ws_decode(p.WS_V5, b"\xff\x00") == (255, b"\x00")
    assert p.ws_port_prefix(8080) == b"\x90\x1f"
    for bad in ("", "x", "0!!"):
        with pytest.raises(p.StreamProtocolError):
            p.ws_decode(p.WS_V4_BASE64, bad)
    with pytest.raises(p.StreamProtocolError):
        p.ws_decode(p.WS_V4, b"")


def test_parse_port() -> None:
    assert p.parse_port("80") == 80
    for bad in ("0", "65536", "-1", "+80", "eighty", ""):
        with pytest.raises(p.StreamProtocolError):
            p.parse_port(bad)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=64), max_size=8))
def test_fuzz_resize_decoder(chunks: list[bytes]) -> None:
    d = p.ResizeDecoder(limit=256)
    try:
        for c in chunks:
            for size in d.feed(c):
                assert 0 <= size.width <= 0xFFFF and 0 <= size.height <= 0xFFFF
    except p.StreamProtocolError:
        pass


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.binary(max_size=64), st.text(max_size=64)),
       st.sampled_from(p.WS_REMOTECOMMAND_PROTOCOLS))
def test_fuzz_ws_decode(message: bytes | str, proto: str) -> None:
    try:
        ch, data = p.ws_decode(proto, message)
        assert 0 <= ch <= 255 and isinstance(data, bytes)
    except p.StreamProtocolError:
        pass
