"""Hostile and broken clients: berthd answers what it can and keeps serving everyone else.

gRPC requests are built by hand with the h2 state machine (grpclib's own transport)
over the unix socket, so that a test can send what no well-behaved client would. Where
containerd gets the same bytes, its answer is the reference.
"""

from __future__ import annotations

import random
import socket
import struct
from dataclasses import dataclass, field
from datetime import UTC, datetime

import h2.config
import h2.connection
import h2.events
import pytest
import trio
from betterproto.lib.google.protobuf import Empty

from berth.core import errdefs
from berth.core.api.containerd.services.events.ttrpc.v1 import Envelope, ForwardRequest
from berth.core.api.containerd.services.leases.v1 import ListRequest as ListLeasesRequest
from berth.core.api.containerd.services.namespaces.v1 import CreateNamespaceRequest, Namespace
from berth.core.ttrpc import codec
from berth.core.ttrpc.client import open_client
from tests import daemons
from tests.daemons import Daemon

pytestmark = pytest.mark.interop

MAX = 16 << 20  # default max_recv_message_size, as in containerd
CREATE_NS = "/containerd.services.namespaces.v1.Namespaces/Create"
LIST_NS = "/containerd.services.namespaces.v1.Namespaces/List"
LIST_LEASES = "/containerd.services.leases.v1.Leases/List"
EVENTS_TTRPC = "containerd.services.events.ttrpc.v1.Events"


@dataclass
class Reply:
    headers: dict[str, str] = field(default_factory=dict)
    trailers: dict[str, str] = field(default_factory=dict)
    data: bytes = b""
    reset: bool = False

    @property
    def status(self) -> tuple[int, str]:
        """(grpc-status, grpc-message) from the trailers, or the trailers-only headers."""
        meta = self.trailers or self.headers
        assert "grpc-status" in meta, self
        return int(meta["grpc-status"]), meta.get("grpc-message", "")


def grpc_raw(address: object, path: str, body: bytes, *, announce: int | None = None,
             prefix: bytes | None = None, namespace: str = "default",
             timeout: float = 30.0) -> Reply:
    """One gRPC call with hand-made framing: the 5-byte prefix may lie about the length."""
    sock = socket.socket(socket.AF_UNIX)
    sock.settimeout(timeout)
    sock.connect(str(address))
    conn = h2.connection.H2Connection(
        h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
    conn.initiate_connection()
    sid = conn.get_next_available_stream_id()
    conn.send_headers(sid, [
        (":method", "POST"), (":scheme", "http"), (":path", path),
        (":authority", "localhost"), ("content-type", "application/grpc"), ("te", "trailers"),
        ("containerd-namespace", namespace),
    ])
    if prefix is None:
        prefix = struct.pack(">?I", False, len(body) if announce is None else announce)
    data = memoryview(prefix + body)
    reply, sent, ended = Reply(), 0, False
    try:
        while True:
            # Send what flow control allows; a server that stops reading stops us too.
            while sent < len(data) and conn.local_flow_control_window(sid) > 0:
                n = min(len(data) - sent, conn.local_flow_control_window(sid),
                        conn.max_outbound_frame_size)
                conn.send_data(sid, data[sent:sent + n].tobytes())
                sent += n
            if sent == len(data) and not ended:
                conn.end_stream(sid)
                ended = True
            sock.sendall(conn.data_to_send())
            got = sock.recv(1 << 16)
            if not got:
                return reply
            for ev in conn.receive_data(got):
                if isinstance(ev, h2.events.ResponseReceived):
                    reply.headers = dict(ev.headers)
                elif isinstance(ev, h2.events.TrailersReceived):
                    reply.trailers = dict(ev.headers)
                elif isinstance(ev, h2.events.DataReceived):
                    reply.data += ev.data
                    conn.acknowledge_received_data(ev.flow_controlled_length, sid)
                elif isinstance(ev, h2.events.StreamReset):
                    reply.reset = True
                    return reply
                elif isinstance(ev, h2.events.StreamEnded):
                    return reply
    finally:
        sock.close()


def assert_serving(d: Daemon) -> None:
    assert d.proc is not None and d.proc.poll() is None, d.logs()[-2000:]
    r = daemons.ctr(d.address, "version")
    assert r.rc == 0, r
    server = r.out.partition("Server:")[2]
    assert "Version:  0.1.0" in server and "Revision: berth" in server, r.out


def ttrpc_forward_ok(d: Daemon) -> None:
    """A well-behaved shim: one valid Forward over its own connection."""
    async def run() -> None:
        async with open_client(str(d.ttrpc_address)) as client:
            env = Envelope(timestamp=datetime.now(UTC), namespace="default", topic="/probe/ok")
            await client.call(EVENTS_TTRPC, "Forward", ForwardRequest(envelope=env), Empty,
                              timeout=20)
    trio.run(run)


def read_responses(sock: socket.socket) -> list[codec.CallResponse]:
    """Responses until the server hangs up (or stays silent past the socket timeout)."""
    decoder, out = codec.FrameDecoder(), []
    while True:
        try:
            got = sock.recv(1 << 16)
        except TimeoutError:
            return out
        if not got:
            return out
        decoder.feed(got)
        for frame in decoder:
            assert frame.type == codec.MESSAGE_TYPE_RESPONSE
            out.append(codec.decode_response(frame.payload))


def read_responses_until_one(sock: socket.socket) -> list[codec.CallResponse]:
    decoder = codec.FrameDecoder()
    while True:
        got = sock.recv(1 << 16)
        assert got, "server hung up without answering"
        decoder.feed(got)
        frames = list(decoder)
        if frames:
            return [codec.decode_response(f.payload) for f in frames]


# -- ttrpc ---------------------------------------------------------------------------------


def test_ttrpc_garbage_leaves_other_clients_alone(berthd: Daemon) -> None:
    rnd = random.Random(20240102)
    garbage = bytes(rnd.getrandbits(8) for _ in range(8192))
    held = socket.socket(socket.AF_UNIX)
    held.settimeout(20)
    held.connect(str(berthd.ttrpc_address))
    try:
        held.sendall(garbage)
        # The first "header" announces a frame far over the 4 MiB limit: the server says
        # so on that stream id, then drops the announced bytes as they come.
        (first,) = read_responses_until_one(held)
        assert first.code == errdefs.Code.RESOURCE_EXHAUSTED
        assert "exceed maximum message size of 4194304" in first.message
        # With that connection still open and mid-frame, everyone else is served.
        ttrpc_forward_ok(berthd)
        assert_serving(berthd)
    finally:
        held.close()

    # A well-framed request whose payload is not a ttrpc Request: answered, then hung up.
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(20)
        s.connect(str(berthd.ttrpc_address))
        s.sendall(codec.encode_frame(1, codec.MESSAGE_TYPE_REQUEST, b"\x0a\xff\xff\xff\xff"))
        (resp,) = read_responses(s)
        assert resp.code == errdefs.Code.INVALID_ARGUMENT
        assert resp.message.startswith("unmarshal request error")

    # A connection that dies inside a frame header, and one inside a payload.
    for chunk in (b"\x00\x00\x00", codec.encode_frame(3, 1, b"x" * 64)[:40]):
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(str(berthd.ttrpc_address))
            s.sendall(chunk)
    ttrpc_forward_ok(berthd)
    assert_serving(berthd)


@pytest.mark.parametrize("service,method,message", [
    ("containerd.services.nope.v1.Nope", "Get", "service containerd.services.nope.v1.Nope"),
    (EVENTS_TTRPC, "Publish", "method Publish"),
])
def test_ttrpc_unknown_calls_match_containerd(berthd: Daemon, containerd: Daemon,
                                              service: str, method: str, message: str) -> None:
    async def call(d: Daemon) -> tuple[int, str]:
        async with open_client(str(d.ttrpc_address)) as client:
            with pytest.raises(errdefs.BerthError) as info:
                await client.call(service, method, Empty(), Empty, timeout=20)
        return int(info.value.code), info.value.message

    for d in (berthd, containerd):
        assert trio.run(call, d) == (errdefs.Code.UNIMPLEMENTED, message)
    assert_serving(berthd)


# -- gRPC ----------------------------------------------------------------------------------


def test_truncated_grpc_message(berthd: Daemon, containerd: Daemon) -> None:
    # Announce 100 bytes, send 10, end the stream.
    for d in (berthd, containerd):
        reply = grpc_raw(d.address, CREATE_NS, b"0123456789", announce=100)
        assert reply.headers.get("content-type", "").startswith("application/grpc"), reply
        code, message = reply.status
        # containerd: Unknown "unexpected EOF".
        assert code in (errdefs.Code.UNKNOWN, errdefs.Code.INTERNAL) and message, reply
    # A prefix cut short, and a stream that ends before any message at all.
    reply = grpc_raw(berthd.address, CREATE_NS, b"", prefix=b"\x00\x00")
    assert reply.status[0] != 0
    reply = grpc_raw(berthd.address, LIST_NS, b"", prefix=b"")
    assert reply.status[0] != 0
    # Nothing was created by any of it.
    assert daemons.ctr_ok(berthd.address, "namespaces", "ls", "-q").out == ""
    assert_serving(berthd)


def _unknown_field(total: int) -> bytes:
    """A valid message of exactly ``total`` bytes: one unknown length-delimited field."""
    tag = b"\x7a"  # field 15, wire type 2: unknown to every request type here
    size = total - len(tag) - 4
    length = bytes([(size & 0x7F) | 0x80, ((size >> 7) & 0x7F) | 0x80,
                    ((size >> 14) & 0x7F) | 0x80, size >> 21])
    assert size >> 28 == 0
    return tag + length + bytes(size)


def test_oversized_grpc_message(berthd: Daemon, containerd: Daemon) -> None:
    body = _unknown_field(MAX + 1)
    for d in (berthd, containerd):
        reply = grpc_raw(d.address, LIST_NS, body)
        assert reply.status == (errdefs.Code.RESOURCE_EXHAUSTED,
                                f"grpc: received message larger than max ({MAX + 1} vs. {MAX})")
        assert reply.headers.get("content-type", "").startswith("application/grpc")
    # Exactly the maximum is fine (unknown fields are skipped, as protobuf wants).
    reply = grpc_raw(berthd.address, LIST_NS, _unknown_field(MAX))
    assert reply.status[0] == 0, reply
    assert reply.data[:1] == b"\x00"
    assert_serving(berthd)


def test_invalid_namespace_names(berthd: Daemon, containerd: Daemon) -> None:
    cases = [
        (CREATE_NS, bytes(CreateNamespaceRequest(namespace=Namespace(name="a/b"))), "default"),
        (CREATE_NS, bytes(CreateNamespaceRequest(namespace=Namespace(name="x" * 77))),
         "default"),
        (CREATE_NS, bytes(CreateNamespaceRequest()), "default"),
        (LIST_LEASES, bytes(ListLeasesRequest()), "-bad-"),
    ]
    for path, body, ns in cases:
        got = grpc_raw(berthd.address, path, body, namespace=ns).status
        want = grpc_raw(containerd.address, path, body, namespace=ns).status
        assert got == want, (path, body[:20], ns)
        assert got[0] == errdefs.Code.INVALID_ARGUMENT and got[1].endswith("invalid argument")
    assert daemons.ctr_ok(berthd.address, "namespaces", "ls", "-q").out == ""
    assert_serving(berthd)


def test_garbage_protobuf_body(berthd: Daemon, containerd: Daemon) -> None:
    # A varint that never ends within 10 bytes cannot be decoded by any protobuf library.
    body = b"\x0a\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01"
    for d in (berthd, containerd):
        code, message = grpc_raw(d.address, CREATE_NS, body).status
        assert code == errdefs.Code.INTERNAL
        assert message.startswith("grpc: error unmarshalling request: "), message
    assert daemons.ctr_ok(berthd.address, "namespaces", "ls", "-q").out == ""
    assert_serving(berthd)


def test_unknown_grpc_paths_match_grpc_go(berthd: Daemon, containerd: Daemon) -> None:
    for path in ("/containerd.services.nope.v1.Nope/Get",
                 "/containerd.services.version.v1.Version/Nope"):
        reply = grpc_raw(berthd.address, path, b"")
        assert reply.headers.get("content-type", "").startswith("application/grpc"), reply
        assert reply.status == grpc_raw(containerd.address, path, b"").status
        assert reply.status[0] == errdefs.Code.UNIMPLEMENTED
    assert_serving(berthd)


def test_non_ascii_namespace_header(berthd: Daemon, containerd: Daemon) -> None:
    # One request used to end berthd: h2 raised UnicodeDecodeError decoding the header
    # value inside the protocol, and the error escaped into the daemon's nursery.
    for args in (("namespaces", "ls"), ("containers", "ls")):
        got = daemons.ctr(berthd.address, *args, namespace="é")
        want = daemons.ctr(containerd.address, *args, namespace="é")
        assert (got.rc, got.out, got.err) == (want.rc, want.out, want.err), (args, got, want)
    assert 'namespace validation: identifier "é" must match' in got.err, got
    assert_serving(berthd)
    # Bytes that are not UTF-8 at all: that connection may end, berthd may not.
    sock = socket.socket(socket.AF_UNIX)
    sock.settimeout(20)
    sock.connect(str(berthd.address))
    try:
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        conn.initiate_connection()
        conn.send_headers(1, [
            (b":method", b"POST"), (b":scheme", b"http"), (b":path", LIST_NS.encode()),
            (b":authority", b"localhost"), (b"content-type", b"application/grpc"),
            (b"te", b"trailers"), (b"containerd-namespace", b"\xff\xfe\x80"),
        ], end_stream=True)
        sock.sendall(conn.data_to_send())
        while sock.recv(1 << 16):  # answered or closed, either is fine
            pass
    except (TimeoutError, ConnectionResetError):
        pass
    finally:
        sock.close()
    assert_serving(berthd)
