"""The ttrpc frame codec and envelope, checked against the wire layout and the generated
protobuf classes (core.api.ttrpc, core.api.google.rpc)."""

from __future__ import annotations

import random

import betterproto.lib.google.protobuf as pb
import pytest

from berth.core import errdefs
from berth.core.api.google.rpc import Status
from berth.core.api.ttrpc import KeyValue, Request, Response
from berth.core.ttrpc import codec
from berth.core.ttrpc.codec import (
    MAX_MESSAGE_LENGTH,
    CallRequest,
    CallResponse,
    Frame,
    FrameDecoder,
    FrameTooLarge,
    MessageDecodeError,
    TruncatedFrame,
)


def frame_bytes(stream_id: int, mtype: int, payload: bytes, flags: int = 0) -> bytes:
    return codec.encode_frame(stream_id, mtype, payload, flags)


# -- header -----------------------------------------------------------------------------


def test_header_layout_is_big_endian_length_stream_type_flags():
    assert codec.pack_header(5, 1, codec.MESSAGE_TYPE_REQUEST) == (
        b"\x00\x00\x00\x05" b"\x00\x00\x00\x01" b"\x01" b"\x00"
    )
    assert codec.pack_header(0x01020304, 0xA0B0C0D0, 2, 0x7F) == bytes.fromhex(
        "01020304" "a0b0c0d0" "02" "7f"
    )
    assert codec.unpack_header(bytes.fromhex("01020304a0b0c0d0027f")) == (
        0x01020304, 0xA0B0C0D0, 2, 0x7F,
    )


def test_header_rejects_out_of_range_and_short_input():
    with pytest.raises(ValueError):
        codec.pack_header(1 << 32, 1, 1)
    with pytest.raises(ValueError):
        codec.pack_header(1, -1, 1)
    with pytest.raises(TruncatedFrame):
        codec.unpack_header(b"\x00" * 9)


# -- decoder ----------------------------------------------------------------------------


def sample_frames() -> list[Frame]:
    return [
        Frame(1, codec.MESSAGE_TYPE_REQUEST, 0, b"first"),
        Frame(3, codec.MESSAGE_TYPE_RESPONSE, 0, b""),
        Frame(5, codec.MESSAGE_TYPE_DATA, 0x3, bytes(range(256)) * 40),
        Frame(0xFFFFFFFF, 0x77, 0xFF, b"\x00"),  # unknown type passes through
    ]


def wire_of(frames: list[Frame]) -> bytes:
    return b"".join(frame_bytes(f.stream_id, f.type, f.payload, f.flags) for f in frames)


def test_decoder_splits_one_feed_into_frames():
    decoder = FrameDecoder()
    decoder.feed(wire_of(sample_frames()))
    assert list(decoder) == sample_frames()
    assert decoder.buffered == 0
    decoder.eof()


def test_decoder_byte_by_byte():
    wire = wire_of(sample_frames())
    decoder = FrameDecoder()
    got = []
    for i in range(len(wire)):
        decoder.feed(wire[i : i + 1])
        got.extend(decoder)
    assert got == sample_frames()
    decoder.eof()


def test_decoder_random_split_points():
    wire = wire_of(sample_frames()) * 3
    rng = random.Random(7)
    for _ in range(50):
        decoder = FrameDecoder()
        got = []
        pos = 0
        while pos < len(wire):
            step = rng.randint(1, 700)
            decoder.feed(memoryview(wire)[pos : pos + step])
            got.extend(decoder)
            pos += step
        assert got == sample_frames() * 3


def test_decoder_holds_partial_frame_until_complete():
    wire = frame_bytes(9, 1, b"abcdef")
    decoder = FrameDecoder()
    decoder.feed(wire[:12])
    assert decoder.next_frame() is None
    assert decoder.in_frame
    with pytest.raises(TruncatedFrame):
        decoder.eof()
    decoder.feed(wire[12:])
    assert decoder.next_frame() == Frame(9, 1, 0, b"abcdef")
    assert not decoder.in_frame


def test_decoder_payload_survives_later_feeds():
    decoder = FrameDecoder()
    decoder.feed(frame_bytes(1, 1, b"keep me"))
    frame = decoder.next_frame()
    decoder.feed(frame_bytes(3, 1, b"x" * 1000))
    assert frame.payload == b"keep me"
    assert isinstance(frame.payload, bytes)


def test_oversized_frame_raises_with_stream_id_and_go_message_then_decoding_resumes():
    limit = MAX_MESSAGE_LENGTH
    oversized = codec.pack_header(limit + 1, 7, codec.MESSAGE_TYPE_REQUEST)
    decoder = FrameDecoder()
    decoder.feed(oversized)
    with pytest.raises(FrameTooLarge) as info:
        decoder.next_frame()
    err = info.value
    assert err.stream_id == 7
    assert err.length == limit + 1
    assert str(err) == f"message length {limit + 1} exceed maximum message size of {limit}"
    assert errdefs.to_status(err) == (errdefs.Code.RESOURCE_EXHAUSTED, str(err))
    # The body is dropped as it arrives, never held.
    chunk = b"\xaa" * 65536
    remaining = limit + 1
    while remaining > len(chunk):
        decoder.feed(chunk)
        remaining -= len(chunk)
        assert decoder.buffered == 0
        assert decoder.next_frame() is None
    with pytest.raises(TruncatedFrame):
        decoder.eof()
    # The end of the oversized body and the next frame arrive in one feed.
    decoder.feed(b"\xaa" * remaining + frame_bytes(9, 1, b"next"))
    assert list(decoder) == [Frame(9, 1, 0, b"next")]
    decoder.eof()


def test_oversized_frame_whose_body_is_already_buffered():
    decoder = FrameDecoder(max_length=16)
    decoder.feed(frame_bytes(1, 1, b"y" * 17) + frame_bytes(3, 1, b"ok"))
    with pytest.raises(FrameTooLarge) as info:
        decoder.next_frame()
    assert info.value.stream_id == 1
    assert list(decoder) == [Frame(3, 1, 0, b"ok")]


def test_frame_of_exactly_the_limit_is_accepted():
    decoder = FrameDecoder(max_length=32)
    decoder.feed(frame_bytes(1, 1, b"z" * 32))
    assert decoder.next_frame().payload == b"z" * 32


def test_garbage_gives_a_clear_error_and_bounded_memory():
    decoder = FrameDecoder()
    decoder.feed(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    with pytest.raises(FrameTooLarge) as info:
        decoder.next_frame()
    assert info.value.length == int.from_bytes(b"GET ", "big")
    with pytest.raises(TruncatedFrame):
        decoder.eof()

    rng = random.Random(1)
    decoder = FrameDecoder()
    chunk_size = 65536
    errors = 0
    for _ in range(160):  # 10 MiB of noise
        decoder.feed(rng.randbytes(chunk_size))
        while True:
            try:
                frame = decoder.next_frame()
            except FrameTooLarge:
                errors += 1
                continue
            if frame is None:
                break
        assert decoder.buffered <= MAX_MESSAGE_LENGTH + codec.HEADER_LENGTH + chunk_size
    assert errors >= 1


# -- envelope against the generated classes ---------------------------------------------


def test_request_encoding_matches_generated_class():
    generated = Request(
        service="containerd.task.v2.Task",
        method="Connect",
        payload=b"\n\x04abcd",
        timeout_nano=1_500_000_000,
        metadata=[KeyValue("containerd-namespace-ttrpc", "default"), KeyValue("k", "v")],
    )
    ours = CallRequest(
        "containerd.task.v2.Task",
        "Connect",
        b"\n\x04abcd",
        1_500_000_000,
        [("containerd-namespace-ttrpc", "default"), ("k", "v")],
    )
    assert codec.encode_request(ours) == bytes(generated)
    assert codec.decode_request(bytes(generated)) == ours


def test_request_negative_timeout_and_empty_fields():
    generated = Request(service="s", timeout_nano=-5)
    decoded = codec.decode_request(bytes(generated))
    assert decoded == CallRequest("s", "", b"", -5, [])
    assert Request().parse(codec.encode_request(decoded)).timeout_nano == -5
    assert codec.encode_request(CallRequest("", "")) == b""
    assert codec.decode_request(b"") == CallRequest("", "", b"", 0, [])


def test_request_unknown_fields_are_skipped():
    extra = (
        b"\x48\x96\x01"  # field 9 varint
        b"\x51" + b"\x00" * 8  # field 10 fixed64
        + b"\x5d" + b"\x00" * 4  # field 11 fixed32
        + b"\x62\x03abc"  # field 12 bytes
    )
    wire = extra + bytes(Request(service="svc", method="m"))
    assert codec.decode_request(wire) == CallRequest("svc", "m", b"", 0, [])


@pytest.mark.parametrize(
    "wire",
    [
        b"\x0a\x50abc",  # string longer than the message
        b"\x0a",  # length missing
        b"\x20" + b"\xff" * 11,  # varint past 64 bits
        b"\x20\xff",  # varint cut short
        b"\x0b",  # group wire type
        b"\x02\x00",  # field number 0
        b"\x0a\x02\xff\xfe",  # service not UTF-8
        b"\x08\x01",  # service as a varint
        b"\x22\x02\x00\x00",  # timeout_nano sent length-delimited
        b"\x2a\x03\x0a\x05x",  # metadata entry truncated inside
        b"\x51\x00\x00",  # fixed64 cut short
    ],
)
def test_request_garbage_raises_message_decode_error(wire):
    with pytest.raises(MessageDecodeError):
        codec.decode_request(wire)


def test_response_ok_always_carries_a_status_like_go():
    assert codec.encode_response(CallResponse()) == b"\x0a\x00"
    parsed = Response().parse(codec.encode_response(CallResponse(payload=b"pp")))
    assert parsed.payload == b"pp"
    assert parsed.status.code == 0


def test_response_round_trips_with_generated_class():
    detail = pb.Any(type_url="type.googleapis.com/x.Y", value=b"\x08\x01")
    generated = Response(
        status=Status(code=5, message='container "c": not found', details=[detail]),
        payload=b"\x01\x02",
    )
    decoded = codec.decode_response(bytes(generated))
    assert decoded == CallResponse(5, 'container "c": not found', b"\x01\x02", [bytes(detail)])
    back = Response().parse(codec.encode_response(decoded))
    assert back.status.code == 5
    assert back.status.message == 'container "c": not found'
    assert back.status.details[0].type_url == "type.googleapis.com/x.Y"
    assert back.payload == b"\x01\x02"


def test_response_negative_status_code():
    decoded = codec.decode_response(bytes(Response(status=Status(code=-3, message="odd"))))
    assert decoded.code == -3
    assert Response().parse(codec.encode_response(decoded)).status.code == -3


def test_response_without_status_is_ok():
    assert codec.decode_response(b"") == CallResponse(0, "", b"", [])


def test_response_garbage_raises():
    with pytest.raises(MessageDecodeError):
        codec.decode_response(b"\x0a\x05\x08")


# -- metadata and frames ----------------------------------------------------------------


def test_metadata_flattening_and_grouping():
    pairs = codec.metadata_pairs({"Containerd-Namespace-TTRPC": "ns", "multi": ["a", "b"]})
    assert pairs == [("containerd-namespace-ttrpc", "ns"), ("multi", "a"), ("multi", "b")]
    assert codec.metadata_pairs(None) == []
    assert codec.metadata_dict(pairs) == {
        "containerd-namespace-ttrpc": ["ns"],
        "multi": ["a", "b"],
    }


def test_request_frame_checks_the_limit():
    frame = codec.request_frame(3, CallRequest("s", "m", b"p"))
    decoder = FrameDecoder()
    decoder.feed(frame)
    got = decoder.next_frame()
    assert (got.stream_id, got.type) == (3, codec.MESSAGE_TYPE_REQUEST)
    assert codec.decode_request(got.payload) == CallRequest("s", "m", b"p", 0, [])
    with pytest.raises(FrameTooLarge) as info:
        codec.request_frame(5, CallRequest("s", "m", b"x" * 100), max_length=64)
    assert info.value.stream_id == 5


def test_oversized_response_becomes_resource_exhausted():
    frame = codec.response_frame(11, CallResponse(payload=b"x" * 100), max_length=64)
    decoder = FrameDecoder(max_length=64)
    decoder.feed(frame)
    got = decoder.next_frame()
    assert got.stream_id == 11
    response = codec.decode_response(got.payload)
    assert response.code == errdefs.Code.RESOURCE_EXHAUSTED
    assert response.message.startswith("message length ")
    assert response.payload == b""
