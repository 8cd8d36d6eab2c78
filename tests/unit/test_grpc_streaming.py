"""Server-streaming calls through berth's gRPC server (core/grpc), end to end.

A real grpclib client (asyncio, hosted by trio-asyncio in the test only) talks to
``berth.core.grpc.server.serve`` over a unix socket in a temporary folder; the service
is a stand-in for Content.Read whose behaviour each request picks (by digest).
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpclib.client
import grpclib.config
import grpclib.const
import pytest
import trio
import trio_asyncio
from grpclib import GRPCError
from grpclib.const import Status

from berth.core import errdefs
from berth.core.api.containerd.services.content import v1 as api
from berth.core.grpc import bridge, server
from berth.core.grpc.context import CallContext

READ = "/containerd.services.content.v1.Content/Read"
BIG = bytes(range(256)) * 1500  # 384000 bytes: several flow-control windows


class FakeContent:
    base = api.ContentBase

    def __init__(self) -> None:
        self.cancelled = trio.Event()
        self.namespaces: list[str | None] = []

    def info(self, ctx: CallContext, req: api.InfoRequest) -> api.InfoResponse:
        # A plain def: answered inline by the reading task; 12 KiB of labels (one
        # DATA frame: larger answers go out from a task of their own).
        return api.InfoResponse(info=api.Info(digest=req.digest, size=len(req.digest),
                                              labels={"big": "x" * (12 << 10)}))

    async def read(self, ctx: CallContext, req: api.ReadContentRequest,
                   send: Callable[[api.ReadContentResponse], Awaitable[None]]) -> None:
        self.namespaces.append(ctx.namespace)
        what = req.digest
        if what == "empty":
            return
        if what == "missing":
            raise errdefs.NotFound(f"content {what}")
        if what == "big":
            for i in range(0, len(BIG), 100_000):
                await send(api.ReadContentResponse(offset=i, data=BIG[i:i + 100_000]))
            return
        if what == "fail-late":
            await send(api.ReadContentResponse(offset=0, data=b"first"))
            raise errdefs.FailedPrecondition("went wrong after one message")
        if what == "sleep":  # answers nothing until cancelled
            try:
                await trio.sleep_forever()
            finally:
                self.cancelled.set()
        if what == "hang":
            await send(api.ReadContentResponse(offset=0, data=b"waiting"))
            try:
                await trio.sleep_forever()
            finally:
                self.cancelled.set()
        await send(api.ReadContentResponse(offset=0, data=what.encode()))


@pytest.fixture
async def served() -> AsyncIterator[tuple[Path, FakeContent]]:
    base = Path(tempfile.mkdtemp(prefix="berth-gs-", dir="/tmp"))
    svc = FakeContent()
    try:
        async with trio_asyncio.open_loop(), trio.open_nursery() as nursery:
            sock = base / "grpc.sock"
            await nursery.start(server.serve, bridge.handlers_for(svc, api.ContentBase), sock)
            yield sock, svc
            nursery.cancel_scope.cancel()
    finally:
        shutil.rmtree(base, ignore_errors=True)


async def read(sock: Path, digest: str, *, timeout: float | None = None,
               cancel_after_first: bool = False) -> tuple[list[Any], Status, str | None]:
    """All messages of one Read call, its status and message (as a client sees them)."""

    async def call() -> tuple[list[Any], Status, str | None]:
        # Small windows (grpclib's default is 4 MiB): the server must wait for updates.
        config = grpclib.config.Configuration(http2_connection_window_size=2 ** 16 - 1,
                                              http2_stream_window_size=2 ** 16 - 1)
        channel = grpclib.client.Channel(path=str(sock), config=config)
        got: list[Any] = []
        try:
            async with channel.request(
                READ, grpclib.const.Cardinality.UNARY_STREAM, api.ReadContentRequest,
                api.ReadContentResponse, timeout=timeout,
                metadata={"containerd-namespace": "ns1"},
            ) as stream:
                await stream.send_message(api.ReadContentRequest(digest=digest),
                                          end=True)
                async for msg in stream:
                    got.append(msg)
                    if cancel_after_first:
                        await stream.cancel()
                        return got, Status.CANCELLED, None
        except GRPCError as e:
            return got, e.status, e.message
        except TimeoutError:  # the client's own deadline (grpclib enforces it too)
            return got, Status.DEADLINE_EXCEEDED, None
        finally:
            channel.close()
        return got, Status.OK, None

    with trio.fail_after(30):  # bounds a hang (a lost window update); decides nothing
        return await trio_asyncio.aio_as_trio(call)()


async def test_one_message(served: tuple[Path, FakeContent]) -> None:
    sock, svc = served
    got, status, _ = await read(sock, "hello")
    assert status is Status.OK
    assert [m.data for m in got] == [b"hello"]
    assert svc.namespaces == ["ns1"]


async def test_many_large_messages_wait_for_flow_control(
        served: tuple[Path, FakeContent]) -> None:
    sock, _ = served
    got, status, _ = await read(sock, "big")
    assert status is Status.OK
    assert [m.offset for m in got] == list(range(0, len(BIG), 100_000))
    assert b"".join(m.data for m in got) == BIG


async def test_no_message_is_a_trailers_only_ok(served: tuple[Path, FakeContent]) -> None:
    sock, _ = served
    assert await read(sock, "empty") == ([], Status.OK, None)


async def test_error_before_any_message(served: tuple[Path, FakeContent]) -> None:
    sock, _ = served
    got, status, message = await read(sock, "missing")
    assert (got, status, message) == ([], Status.NOT_FOUND, "content missing: not found")


async def test_error_after_a_message_ends_the_stream_with_it(
        served: tuple[Path, FakeContent]) -> None:
    sock, _ = served
    got, status, message = await read(sock, "fail-late")
    assert [m.data for m in got] == [b"first"]
    assert status is Status.FAILED_PRECONDITION
    assert message == "went wrong after one message: failed precondition"


async def test_client_cancel_cancels_the_service(served: tuple[Path, FakeContent]) -> None:
    sock, svc = served
    got, _, _ = await read(sock, "hang", cancel_after_first=True)
    assert [m.data for m in got] == [b"waiting"]
    with trio.fail_after(10):  # bounds a failure only
        await svc.cancelled.wait()


async def test_deadline_ends_a_running_stream(served: tuple[Path, FakeContent]) -> None:
    sock, svc = served
    got, status, _ = await read(sock, "hang", timeout=0.5)
    assert [m.data for m in got] == [b"waiting"]
    assert status is Status.DEADLINE_EXCEEDED
    with trio.fail_after(10):
        await svc.cancelled.wait()


async def test_the_method_table_comes_from_the_generated_base() -> None:
    method = bridge.handlers_for(FakeContent(), api.ContentBase)[READ]
    assert method.cardinality is grpclib.const.Cardinality.UNARY_STREAM and method.is_async
    assert method.recv_type is api.ReadContentRequest


def _raw_read_request(conn: Any, sid: int, digest: str) -> None:
    conn.send_headers(sid, [
        (b":method", b"POST"), (b":scheme", b"http"), (b":path", READ.encode()),
        (b":authority", b"x"), (b"content-type", b"application/grpc"), (b"te", b"trailers"),
        (b"containerd-namespace", b"ns1")])
    body = bytes(api.ReadContentRequest(digest=digest))
    conn.send_data(sid, b"\x00" + len(body).to_bytes(4, "big") + body, end_stream=True)


def _wide_open_client() -> Any:
    """A raw h2 client whose windows let the server send all of BIG at once: more than
    a unix socket holds, so the server's writes stop part-way and wait."""
    import h2.settings

    from tests.fuzz import harness
    conn = harness.client_h2()
    conn.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 16 << 20})
    conn.increment_flow_control_window(16 << 20)
    return conn


async def test_a_client_that_reads_late_gets_every_byte(
        served: tuple[Path, FakeContent]) -> None:
    import h2.events

    sock, _ = served
    conn = _wide_open_client()
    _raw_read_request(conn, 1, "big")
    with trio.fail_after(30):
        stream = await trio.open_unix_socket(str(sock))
        async with stream:
            await stream.send_all(conn.data_to_send())
            await trio.sleep(0.3)  # read nothing: the server's socket buffer fills
            body = bytearray()
            trailers: dict[bytes, bytes] = {}
            while not trailers:
                data = await stream.receive_some(1 << 16)
                assert data, "connection closed before the trailers"
                for ev in conn.receive_data(data):
                    if isinstance(ev, h2.events.DataReceived):
                        body += ev.data
                        conn.acknowledge_received_data(ev.flow_controlled_length,
                                                       ev.stream_id)
                    elif isinstance(ev, h2.events.TrailersReceived):
                        trailers = dict(ev.headers)
                pending = conn.data_to_send()
                if pending:
                    await stream.send_all(pending)
    assert trailers[b"grpc-status"] == b"0"
    got = []
    while body:
        n = int.from_bytes(body[1:5], "big")
        got.append(api.ReadContentResponse().parse(bytes(body[5:5 + n])))
        del body[:5 + n]
    assert b"".join(m.data for m in got) == BIG


async def test_a_client_gone_mid_answer_leaves_the_server_serving(
        served: tuple[Path, FakeContent]) -> None:
    sock, _ = served
    for _ in range(3):
        conn = _wide_open_client()
        _raw_read_request(conn, 1, "big")
        with trio.fail_after(30):
            stream = await trio.open_unix_socket(str(sock))
            await stream.send_all(conn.data_to_send())
            await trio.sleep(0.1)  # the server is now waiting to write the rest
            await stream.aclose()
    got, status, _ = await read(sock, "hello")
    assert status is Status.OK and [m.data for m in got] == [b"hello"]


async def _exchange(stream: Any, conn: Any, until: Callable[[list[Any]], bool]) -> list[Any]:
    """h2 events from the server until ``until(events so far)``."""
    events: list[Any] = []
    while not until(events):
        data = await stream.receive_some(1 << 16)
        assert data, "connection closed"
        events += conn.receive_data(data)
        pending = conn.data_to_send()
        if pending:
            await stream.send_all(pending)
    return events


async def test_a_call_that_waits_first_lets_the_ping_ack_out_and_a_reset_cancels_it(
        served: tuple[Path, FakeContent]) -> None:
    """What a read made (here a PING ACK) leaves when a call it started first waits,
    not when that call answers."""
    import h2.errors
    import h2.events

    sock, svc = served
    conn = _wide_open_client()
    _raw_read_request(conn, 1, "sleep")
    conn.ping(b"12345678")
    with trio.fail_after(30):
        stream = await trio.open_unix_socket(str(sock))
        async with stream:
            await stream.send_all(conn.data_to_send())
            events = await _exchange(stream, conn, lambda evs: any(
                isinstance(e, h2.events.PingAckReceived) for e in evs))
            assert [e.ping_data for e in events
                    if isinstance(e, h2.events.PingAckReceived)] == [b"12345678"]
            assert not svc.cancelled.is_set()
            conn.reset_stream(1, h2.errors.ErrorCodes.CANCEL)
            await stream.send_all(conn.data_to_send())
            await svc.cancelled.wait()


async def test_calls_started_by_one_read_all_answer(served: tuple[Path, FakeContent]) -> None:
    import h2.events

    sock, _ = served
    conn = _wide_open_client()
    for sid, digest in ((1, "one"), (3, "two"), (5, "empty"), (7, "missing")):
        _raw_read_request(conn, sid, digest)
    with trio.fail_after(30):
        stream = await trio.open_unix_socket(str(sock))
        async with stream:
            await stream.send_all(conn.data_to_send())
            events = await _exchange(stream, conn, lambda evs: sum(
                isinstance(e, h2.events.StreamEnded) for e in evs) == 4)
    status: dict[int, bytes] = {}
    data: dict[int, bytes] = {}
    for e in events:
        if isinstance(e, (h2.events.TrailersReceived, h2.events.ResponseReceived)):
            status.update((e.stream_id, v) for k, v in e.headers if k == b"grpc-status")
        elif isinstance(e, h2.events.DataReceived):
            data[e.stream_id] = data.get(e.stream_id, b"") + e.data
    assert status == {1: b"0", 3: b"0", 5: b"0", 7: b"5"}
    assert data[1].endswith(b"one") and data[3].endswith(b"two") and 5 not in data


async def test_inline_answers_wait_for_a_client_that_reads_late(
        served: tuple[Path, FakeContent]) -> None:
    """Answers made by the reading task (plain def methods) that no longer fit the
    socket wait there, in order, and all arrive once the client reads."""
    import h2.events

    sock, _ = served
    conn = _wide_open_client()
    calls = 40  # about 480 KiB of answers: more than a socket buffer
    for k in range(calls):
        sid = 1 + 2 * k
        conn.send_headers(sid, [
            (b":method", b"POST"), (b":scheme", b"http"),
            (b":path", b"/containerd.services.content.v1.Content/Info"),
            (b":authority", b"x"), (b"content-type", b"application/grpc"),
            (b"te", b"trailers"), (b"containerd-namespace", b"ns1")])
        body = bytes(api.InfoRequest(digest=f"d{k}"))
        conn.send_data(sid, b"\x00" + len(body).to_bytes(4, "big") + body, end_stream=True)
    with trio.fail_after(30):
        stream = await trio.open_unix_socket(str(sock))
        async with stream:
            await stream.send_all(conn.data_to_send())
            await trio.sleep(0.3)  # read nothing: the server's socket buffer fills
            events = await _exchange(stream, conn, lambda evs: sum(
                isinstance(e, h2.events.StreamEnded) for e in evs) == calls)
    data: dict[int, bytes] = {}
    status: dict[int, bytes] = {}
    for e in events:
        if isinstance(e, h2.events.DataReceived):
            data[e.stream_id] = data.get(e.stream_id, b"") + e.data
        elif isinstance(e, h2.events.TrailersReceived):
            status.update((e.stream_id, v) for k, v in e.headers if k == b"grpc-status")
    assert set(status.values()) == {b"0"} and len(status) == calls
    for k in range(calls):
        msg = api.InfoResponse().parse(data[1 + 2 * k][5:])
        assert msg.info.digest == f"d{k}" and len(msg.info.labels["big"]) == 12 << 10
