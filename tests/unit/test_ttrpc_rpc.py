"""ttrpc client and server talking over a real unix socket in a temporary directory."""

from __future__ import annotations

import functools
import math
import os
import socket
import stat
import tempfile
from collections.abc import Awaitable, Callable, Iterator

import pytest
import trio

from berth.core import errdefs
from berth.core.api.containerd.task.v2 import ConnectRequest, ConnectResponse
from berth.core.api.ttrpc import KeyValue
from berth.core.ttrpc import Context, Method, Server, codec, open_client, server as server_module
from berth.core.ttrpc.codec import CallRequest, FrameDecoder

Code = errdefs.Code


def guarded(test: Callable[..., Awaitable[None]]) -> Callable[..., Awaitable[None]]:
    """Fail a test that hangs instead of stalling the run; nothing is measured by it."""

    @functools.wraps(test)
    async def run(*args: object, **kwargs: object) -> None:
        with trio.fail_after(60):
            await test(*args, **kwargs)

    return run


@pytest.fixture
def sock_dir() -> Iterator[str]:
    # pytest's tmp_path can exceed the 108-byte limit of a unix socket path.
    with tempfile.TemporaryDirectory(prefix="ttrpc-", dir="/tmp") as path:
        yield path


class Echo:
    """A test service recording what its handlers saw."""

    def __init__(self) -> None:
        self.contexts: list[Context] = []
        self.in_flight = 0
        self.gate = trio.Event()
        self.gate_at: int | None = None
        self.cancelled = trio.Event()

    async def echo(self, ctx: Context, req: KeyValue) -> KeyValue:
        self.contexts.append(ctx)
        return KeyValue(key=req.key, value=req.value[::-1])

    async def wait_all(self, ctx: Context, req: KeyValue) -> KeyValue:
        # Answers only once gate_at calls are in the handler at the same time.
        self.in_flight += 1
        if self.in_flight == self.gate_at:
            self.gate.set()
        await self.gate.wait()
        return KeyValue(key=req.key, value=f"{req.value}!")

    async def fail(self, ctx: Context, req: KeyValue) -> KeyValue:
        kind = req.key
        if kind == "notfound":
            raise errdefs.NotFound(f"container {req.value!r}")
        if kind == "precondition":
            raise errdefs.FailedPrecondition("task must be stopped")
        if kind == "plain":
            raise RuntimeError("boom")
        if kind == "group":
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._raise_exists)
        raise AssertionError(kind)

    async def _raise_exists(self) -> None:
        raise errdefs.AlreadyExists("id x")

    async def hang(self, ctx: Context, req: KeyValue) -> KeyValue:
        self.contexts.append(ctx)
        try:
            await trio.sleep_forever()
        finally:
            self.cancelled.set()

    async def nothing(self, ctx: Context, req: KeyValue) -> KeyValue:
        return None  # type: ignore[return-value]

    async def connect(self, ctx: Context, req: ConnectRequest) -> ConnectResponse:
        return ConnectResponse(shim_pid=os.getpid(), task_pid=len(req.id), version="t")

    def methods(self) -> dict[str, Method]:
        return {
            "Echo": Method(KeyValue, self.echo),
            "WaitAll": Method(KeyValue, self.wait_all),
            "Fail": Method(KeyValue, self.fail),
            "Hang": Method(KeyValue, self.hang),
            "Nothing": (KeyValue, self.nothing),
            "Connect": Method(ConnectRequest, self.connect),
        }


SERVICE = "berth.test.Echo"


@pytest.fixture
async def echo() -> Echo:
    return Echo()


@pytest.fixture
async def address(nursery, sock_dir, echo) -> str:
    server = Server()
    server.register(SERVICE, echo.methods())
    path = os.path.join(sock_dir, "echo.sock")
    started = await nursery.start(server.serve_unix, path)
    assert started == path
    return path


async def raw_exchange(path: str, data: bytes, expect: int | None = None) -> list[codec.Frame]:
    """Send bytes and collect ``expect`` response frames, or with ``expect=None``
    half-close and collect whatever comes until the server hangs up. (Like Go's, our
    server drops calls still running when the client stops sending.)"""
    stream = await trio.open_unix_socket(path)
    async with stream:
        await stream.send_all(data)
        if expect is not None:
            return await read_frames(stream, FrameDecoder(), expect)
        await stream.send_eof()
        frames, _ = await read_until_eof(stream)
        return frames


async def read_until_eof(stream: trio.SocketStream) -> tuple[list[codec.Frame], bool]:
    decoder = FrameDecoder()
    frames = []
    while True:
        try:
            data = await stream.receive_some(65536)
        except trio.BrokenResourceError:
            return frames, True
        if not data:
            return frames, True
        decoder.feed(data)
        frames.extend(decoder)


async def read_frames(stream: trio.SocketStream, decoder: FrameDecoder, count: int):
    frames: list[codec.Frame] = []
    while len(frames) < count:
        data = await stream.receive_some(65536)
        assert data, "server hung up early"
        decoder.feed(data)
        frames.extend(decoder)
    return frames


def request_bytes(stream_id: int, method: str, message, **kw) -> bytes:
    return codec.request_frame(stream_id, CallRequest(SERVICE, method, bytes(message), **kw))


# -- calls ------------------------------------------------------------------------------


@guarded
async def test_unary_echo_with_metadata_and_namespace(address, echo):
    async with open_client(address) as client:
        reply = await client.call(
            SERVICE, "Echo", KeyValue(key="k", value="hello"), KeyValue,
            metadata={"containerd-namespace-ttrpc": "default", "Multi": ["a", "b"]},
        )
        assert reply == KeyValue(key="k", value="olleh")
        # Shielded from the guard's deadline, the call carries none (timeout_nano 0).
        with trio.CancelScope(shield=True):
            plain = await client.call(SERVICE, "Echo", KeyValue(key="2"), KeyValue)
        assert plain.key == "2"
    first, second = echo.contexts
    assert first.namespace == "default"
    assert first.metadata["multi"] == ["a", "b"]
    assert first.get("MULTI") == "a"
    assert first.deadline < math.inf  # the guard's deadline travelled with the call
    assert (first.service, first.method) == (SERVICE, "Echo")
    assert first.peer is not None and first.peer.pid == os.getpid()
    assert first.peer.uid == os.geteuid()
    assert second.namespace is None
    assert second.deadline == math.inf


@guarded
async def test_generated_task_message_types(address):
    async with open_client("unix://" + address) as client:
        reply = await client.call(SERVICE, "Connect", ConnectRequest(id="abc"), ConnectResponse)
    assert reply.shim_pid == os.getpid()
    assert reply.task_pid == 3
    assert reply.version == "t"


@guarded
async def test_errors_map_both_ways(address):
    async with open_client(address) as client:
        with pytest.raises(errdefs.NotFound) as info:
            await client.call(SERVICE, "Fail", KeyValue("notfound", "c1"), KeyValue)
        assert str(info.value) == "container 'c1': not found"
        with pytest.raises(errdefs.FailedPrecondition) as info:
            await client.call(SERVICE, "Fail", KeyValue("precondition"), KeyValue)
        assert str(info.value) == "task must be stopped: failed precondition"
        with pytest.raises(errdefs.Unknown) as info:
            await client.call(SERVICE, "Fail", KeyValue("plain"), KeyValue)
        assert str(info.value) == "boom"
        with pytest.raises(errdefs.AlreadyExists) as info:
            await client.call(SERVICE, "Fail", KeyValue("group"), KeyValue)
        assert str(info.value) == "id x: already exists"
        with pytest.raises(errdefs.Unknown) as info:
            await client.call(SERVICE, "Nothing", KeyValue(), KeyValue)
        assert str(info.value) == "ttrpc: marshal called with nil"
        # The connection is still good after all of that.
        assert (await client.call(SERVICE, "Echo", KeyValue(value="ab"), KeyValue)).value == "ba"


@guarded
async def test_unknown_service_and_method_get_go_status(address):
    async with open_client(address) as client:
        with pytest.raises(errdefs.NotImplemented_) as info:
            await client.call("no.such.Service", "Echo", KeyValue(), KeyValue)
        assert info.value.code == Code.UNIMPLEMENTED
        assert str(info.value) == "service no.such.Service"
        with pytest.raises(errdefs.NotImplemented_) as info:
            await client.call(SERVICE, "Missing", KeyValue(), KeyValue)
        assert str(info.value) == "method Missing"


@guarded
async def test_concurrent_calls_interleave_on_one_connection(address, echo):
    count = 40
    echo.gate_at = count
    results: dict[int, str] = {}
    async with open_client(address) as client:

        async def one(i: int) -> None:
            reply = await client.call(SERVICE, "WaitAll", KeyValue(str(i), f"v{i}"), KeyValue)
            results[i] = f"{reply.key}:{reply.value}"

        async with trio.open_nursery() as nursery:
            for i in range(count):
                nursery.start_soon(one, i)
    # Every handler was running at once (none answered before the last arrived) and
    # every caller got its own answer back.
    assert echo.in_flight == count
    assert results == {i: f"{i}:v{i}!" for i in range(count)}


@guarded
async def test_large_and_small_requests_at_once_arrive_whole(address, echo):
    # Requests far larger than a unix socket's buffer: a caller's own write takes part of
    # one and the writer task the rest, while other callers keep sending. Every frame
    # must still arrive whole and in one piece (the server would drop the connection on
    # a torn frame) and every caller get its own answer.
    results: dict[int, str] = {}
    async with open_client(address) as client:

        async def one(i: int) -> None:
            value = f"{i}-" + ("y" * (1_500_000 if i % 3 == 0 else 10))
            reply = await client.call(SERVICE, "Echo", KeyValue(str(i), value), KeyValue)
            results[i] = reply.value

        async with trio.open_nursery() as nursery:
            for i in range(12):
                nursery.start_soon(one, i)
        assert (await client.call(SERVICE, "Echo", KeyValue(value="ab"), KeyValue)).value == "ba"
    assert results == {
        i: (f"{i}-" + ("y" * (1_500_000 if i % 3 == 0 else 10)))[::-1] for i in range(12)
    }


@guarded
async def test_call_cancelled_before_sending_sends_nothing(address, echo):
    async with open_client(address) as client:
        with trio.CancelScope() as scope:
            scope.cancel()
            await client.call(SERVICE, "Echo", KeyValue(key="never"), KeyValue)
        assert scope.cancelled_caught
        assert (await client.call(SERVICE, "Echo", KeyValue(key="after"), KeyValue)).key == "after"
    # Only the second call reached the server.
    assert [c.method for c in echo.contexts] == ["Echo"]


@guarded
async def test_client_timeout_raises_deadline_exceeded_and_server_cancels_handler(address, echo):
    async with open_client(address) as client:
        with pytest.raises(errdefs.DeadlineExceeded) as info:
            await client.call(SERVICE, "Hang", KeyValue(), KeyValue, timeout=0.05)
        assert str(info.value) == "context deadline exceeded"
        await echo.cancelled.wait()  # the server gave up on the handler too
        assert echo.contexts[0].deadline < math.inf
        # A late answer for the abandoned stream would be dropped; the client still works.
        assert (await client.call(SERVICE, "Echo", KeyValue(value="xy"), KeyValue)).value == "yx"


@guarded
async def test_expired_deadline_is_answered_deadline_exceeded(address):
    frames = await raw_exchange(address, request_bytes(1, "Hang", KeyValue(), timeout_nano=-1), 1)
    assert [f.stream_id for f in frames] == [1]
    response = codec.decode_response(frames[0].payload)
    assert (response.code, response.message) == (Code.DEADLINE_EXCEEDED,
                                                 "context deadline exceeded")


@guarded
async def test_enclosing_deadline_travels_as_timeout(address, echo):
    async with open_client(address) as client:
        with trio.CancelScope(shield=True), trio.move_on_after(3600) as scope:
            await client.call(SERVICE, "Echo", KeyValue(), KeyValue)
    # Client and server share the trio clock here; the server starts counting later.
    assert scope.deadline - 1e-6 <= echo.contexts[0].deadline < math.inf


# -- protocol abuse ---------------------------------------------------------------------


@guarded
async def test_oversized_request_answered_resource_exhausted_and_connection_survives(address):
    limit = codec.MAX_MESSAGE_LENGTH
    stream = await trio.open_unix_socket(address)
    async with stream:
        decoder = FrameDecoder()
        await stream.send_all(codec.pack_header(limit + 1, 5, codec.MESSAGE_TYPE_REQUEST))
        await stream.send_all(b"\x00" * (limit + 1))
        await stream.send_all(request_bytes(7, "Echo", KeyValue(value="ok")))
        first, second = await read_frames(stream, decoder, 2)
    assert first.stream_id == 5
    response = codec.decode_response(first.payload)
    assert response.code == Code.RESOURCE_EXHAUSTED
    assert response.message == (
        f"message length {limit + 1} exceed maximum message size of {limit}"
    )
    assert second.stream_id == 7
    assert KeyValue().parse(codec.decode_response(second.payload).payload).value == "ko"


@guarded
async def test_client_refuses_to_send_an_oversized_request(address):
    async with open_client(address) as client:
        with pytest.raises(errdefs.ResourceExhausted) as info:
            big = KeyValue(value="x" * codec.MAX_MESSAGE_LENGTH)
            await client.call(SERVICE, "Echo", big, KeyValue)
        assert "exceed maximum message size of 4194304" in str(info.value)
        assert (await client.call(SERVICE, "Echo", KeyValue(value="ab"), KeyValue)).value == "ba"


@guarded
async def test_undecodable_request_closes_only_that_connection(address):
    async with open_client(address) as good:
        assert (await good.call(SERVICE, "Echo", KeyValue(value="12"), KeyValue)).value == "21"
        stream = await trio.open_unix_socket(address)
        async with stream:
            junk = b"\x0a\x50 not protobuf"
            await stream.send_all(codec.encode_frame(3, codec.MESSAGE_TYPE_REQUEST, junk))
            frames, eof = await read_until_eof(stream)  # no send_eof: the server hangs up
        assert eof
        assert [f.stream_id for f in frames] == [3]
        response = codec.decode_response(frames[0].payload)
        assert response.code == Code.INVALID_ARGUMENT
        assert response.message.startswith("unmarshal request error: ")
        assert (await good.call(SERVICE, "Echo", KeyValue(value="34"), KeyValue)).value == "43"


@guarded
async def test_garbage_bytes_on_one_connection_while_another_client_works(address):
    async with open_client(address) as good:
        async with trio.open_nursery() as nursery:
            for _ in range(3):
                nursery.start_soon(raw_exchange, address, b"GET / HTTP/1.1\r\n\r\n" * 50)
                nursery.start_soon(raw_exchange, address, os.urandom(100_000))
            for i in range(20):
                reply = await good.call(SERVICE, "Echo", KeyValue(value=f"{i}."), KeyValue)
                assert reply.value == f"{i}."[::-1]


@guarded
async def test_even_stream_id_and_unknown_frame_types(address):
    data = (
        codec.encode_frame(1, 0x7, b"future frame type")  # ignored
        + codec.encode_frame(3, codec.MESSAGE_TYPE_RESPONSE, b"")  # ignored
        + request_bytes(2, "Echo", KeyValue(value="even"))
        + request_bytes(5, "Echo", KeyValue(value="odd"))
    )
    frames = await raw_exchange(address, data, 2)
    by_id = {f.stream_id: codec.decode_response(f.payload) for f in frames}
    assert set(by_id) == {2, 5}
    assert (by_id[2].code, by_id[2].message) == (
        Code.INVALID_ARGUMENT, "StreamID must be odd for client initiated streams",
    )
    assert by_id[5].code == Code.OK
    assert KeyValue().parse(by_id[5].payload).value == "ddo"


@guarded
async def test_peer_with_other_uid_is_refused(nursery, sock_dir, echo, monkeypatch):
    server = Server()
    server.register(SERVICE, echo.methods())
    path = os.path.join(sock_dir, "picky.sock")
    await nursery.start(server.serve_unix, path)
    monkeypatch.setattr(server_module.os, "geteuid", lambda: os.getuid() + 4242)
    async with open_client(path) as client:
        with pytest.raises(errdefs.Unavailable) as info:
            await client.call(SERVICE, "Echo", KeyValue(), KeyValue)
        assert str(info.value) == "ttrpc: closed"
    assert echo.contexts == []


# -- connection lifetime ----------------------------------------------------------------


@guarded
async def test_server_going_away_fails_pending_and_later_calls(nursery, sock_dir, echo):
    server = Server()
    server.register(SERVICE, echo.methods())
    path = os.path.join(sock_dir, "dies.sock")
    scope = trio.CancelScope()

    async def run_server(task_status=trio.TASK_STATUS_IGNORED):
        with scope:
            await server.serve_unix(path, task_status=task_status)

    await nursery.start(run_server)
    async with open_client(path) as client:

        async def stop_server_once_hanging():
            while not echo.contexts:
                await trio.sleep(0.01)
            scope.cancel()

        nursery.start_soon(stop_server_once_hanging)
        with pytest.raises(errdefs.Unavailable) as info:
            await client.call(SERVICE, "Hang", KeyValue(), KeyValue)
        assert str(info.value) == "ttrpc: closed"
        await client.wait_closed()
        assert client.closed
        with pytest.raises(errdefs.Unavailable):
            await client.call(SERVICE, "Echo", KeyValue(), KeyValue)
    assert echo.cancelled.is_set()
    assert not os.path.exists(path)


@guarded
async def test_closing_the_client_fails_outstanding_calls(address, echo):
    outcome: list[BaseException] = []

    async def caller(client, task_status=trio.TASK_STATUS_IGNORED):
        task_status.started()
        try:
            await client.call(SERVICE, "Hang", KeyValue(), KeyValue)
        except errdefs.Unavailable as exc:
            outcome.append(exc)

    async with trio.open_nursery() as outer:
        async with open_client(address) as client:
            await outer.start(caller, client)
            while not echo.contexts:
                await trio.sleep(0.01)
    assert [str(e) for e in outcome] == ["ttrpc: closed"]
    await echo.cancelled.wait()  # the server dropped the call with the connection


@guarded
async def test_dial_failure_is_unavailable(sock_dir):
    with pytest.raises(errdefs.Unavailable) as info:
        async with open_client(os.path.join(sock_dir, "absent.sock")):
            pass
    assert "ttrpc: dial" in str(info.value)


# -- the listening socket ---------------------------------------------------------------


@guarded
async def test_socket_is_private_and_removed_on_exit(sock_dir):
    path = os.path.join(sock_dir, "life.sock")
    async with trio.open_nursery() as nursery:
        await nursery.start(Server().serve_unix, path)
        mode = os.stat(path).st_mode
        assert stat.S_ISSOCK(mode)
        assert stat.S_IMODE(mode) == 0o600
        nursery.cancel_scope.cancel()
    assert not os.path.exists(path)


@guarded
async def test_stale_socket_is_replaced_but_live_one_is_not(nursery, sock_dir):
    path = os.path.join(sock_dir, "stale.sock")
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(path)
    stale.close()  # the file stays, nobody listens
    server = Server()
    server.register(SERVICE, Echo().methods())
    await nursery.start(server.serve_unix, path)
    async with open_client(path) as client:
        assert (await client.call(SERVICE, "Echo", KeyValue(value="ab"), KeyValue)).value == "ba"
    with pytest.raises(errdefs.AlreadyExists):
        await Server().serve_unix(path)
    plain = os.path.join(sock_dir, "file")
    open(plain, "w").close()
    with pytest.raises(errdefs.AlreadyExists):
        await Server().serve_unix(plain)
    assert os.path.exists(plain)


@guarded
async def test_duplicate_service_registration_is_refused():
    server = Server()
    server.register(SERVICE, {})
    with pytest.raises(ValueError, match="duplicate service"):
        server.register(SERVICE, {})
