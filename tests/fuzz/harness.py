"""In-process servers for fuzzing and tests: berth's gRPC connection and ttrpc server
on trio memory streams, with stand-in services that cover every call shape."""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import h2.config
import h2.connection
import h2.events
import hypothesis
import structlog
import trio
import trio.testing

from berth.core import errdefs
from berth.core.api.containerd.services.content import v1 as content
from berth.core.api.containerd.services.version.v1 import VersionBase, VersionResponse
from berth.core.grpc import bridge
from berth.core.grpc.connection import Router
from berth.core.grpc.context import CallContext
from berth.core.grpc.server import serve_connection

VERSION = "/containerd.services.version.v1.Version/Version"
# How long one fuzzed exchange may take before the property fails: it bounds a hang
# (a connection berth never closes), it decides nothing about speed.
EXCHANGE_TIMEOUT = 10.0

hypothesis.settings.register_profile(
    "suite", max_examples=150, deadline=None, derandomize=True, database=None,
    suppress_health_check=[hypothesis.HealthCheck.too_slow],
)


class Version:
    def version(self, ctx: CallContext, req: Any) -> VersionResponse:
        ctx.namespace_required()  # reads and validates the fuzzed metadata
        return VersionResponse(version="fuzz", revision=ctx.namespace or "")


class Content:
    """Every other call shape: async unary, server stream, bidi stream."""

    async def info(self, ctx: CallContext, req: content.InfoRequest) -> content.InfoResponse:
        await trio.sleep(0)
        if req.digest == "missing":
            raise errdefs.NotFound(f"content {req.digest}")
        return content.InfoResponse(info=content.Info(digest=req.digest, size=len(req.digest)))

    async def read(self, ctx: CallContext, req: content.ReadContentRequest,
                   send: Callable[[content.ReadContentResponse], Awaitable[None]]) -> None:
        for i in range(min(max(req.size, 0), 4)):
            await send(content.ReadContentResponse(offset=i, data=bytes(min(req.offset, 70000)
                                                                        if req.offset > 0
                                                                        else 1)))

    async def write(self, ctx: CallContext, stream: Any) -> None:
        while (msg := await stream.recv()) is not None:
            await stream.send(content.WriteContentResponse(offset=len(msg.data)))


def router(max_recv: int = 1 << 16) -> Router:
    routes = {**bridge.handlers_for(Version(), VersionBase, max_recv=max_recv),
              **bridge.handlers_for(Content(), content.ContentBase, max_recv=max_recv)}
    return Router(routes, max_recv=max_recv)


class Bug(AssertionError):
    """Our code raised where it should have answered (logged by a boundary)."""


@contextlib.contextmanager
def no_bugs(*events: str) -> Iterator[None]:
    """Fail if a boundary logged one of ``events`` (an exception we did not handle)."""
    with structlog.testing.capture_logs() as logs:
        yield
    bad = [e for e in logs if e.get("event") in events]
    if bad:
        raise Bug(bad)


async def exchange(rt: Router, data: bytes, *, chunks: int = 1) -> bytes:
    """Send ``data`` on a fresh connection, end our side, read until the server hangs up."""
    client, server = trio.testing.memory_stream_pair()
    out = bytearray()
    with trio.fail_after(EXCHANGE_TIMEOUT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve_connection, rt, server)
            step = max(1, len(data) // chunks)
            try:
                for i in range(0, len(data), step):
                    await client.send_all(data[i:i + step])
                await client.send_eof()
            except trio.BrokenResourceError:
                pass  # the server hung up already (as EPIPE on a socket)
            while chunk := await client.receive_some(1 << 16):
                out += chunk
    return bytes(out)


def client_h2() -> h2.connection.H2Connection:
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True,
                                                                header_encoding=None))
    conn.initiate_connection()
    return conn


async def good_call(rt: Router) -> None:
    """A well-formed Version call on a fresh connection must answer OK."""
    conn = client_h2()
    conn.send_headers(1, [
        (b":method", b"POST"), (b":scheme", b"http"), (b":path", VERSION.encode()),
        (b":authority", b"x"), (b"content-type", b"application/grpc"), (b"te", b"trailers"),
        (b"containerd-namespace", b"default")])
    conn.send_data(1, b"\x00\x00\x00\x00\x00", end_stream=True)
    client, server = trio.testing.memory_stream_pair()
    status = data = None
    with trio.fail_after(EXCHANGE_TIMEOUT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve_connection, rt, server)
            await client.send_all(conn.data_to_send())
            while status is None:
                got = await client.receive_some(1 << 16)
                assert got, "server hung up before answering"
                for ev in conn.receive_data(got):
                    if isinstance(ev, h2.events.DataReceived):
                        data = ev.data
                    elif isinstance(ev, (h2.events.TrailersReceived,
                                         h2.events.ResponseReceived)):
                        status = dict(ev.headers).get(b"grpc-status", status)
            await client.aclose()
    assert status == b"0", status
    assert data is not None and VersionResponse().parse(data[5:]).version == "fuzz"


def run_long(name: str, properties: list[Callable[[], None]],
             argv: list[str] | None = None) -> int:
    """The command line of a long-running fuzz target: rounds of random examples (a new
    seed each round) until the time is up; a falsifying example is printed, and the
    search goes on."""
    p = argparse.ArgumentParser(prog=f"python -m tests.fuzz.{name}")
    p.add_argument("--hours", type=float, default=1.0)
    p.add_argument("--examples", type=int, default=2000, help="examples per round")
    args = p.parse_args(argv)
    from berth.core import log as logsetup
    logsetup.setup("error")
    long = hypothesis.settings(
        max_examples=args.examples, deadline=None, database=None,
        suppress_health_check=list(hypothesis.HealthCheck))
    runs = [long(prop) for prop in properties]  # a function takes settings only once
    started = time.monotonic()
    end = started + args.hours * 3600
    examples = failures = 0
    while time.monotonic() < end:
        for prop, run in zip(properties, runs, strict=True):
            t0 = time.monotonic()
            try:
                run()
            except Exception as e:  # a falsifying example: print it and go on
                failures += 1
                print(f"FOUND in {prop.__name__}: {e!r}", file=sys.stderr, flush=True)
            examples += args.examples
            print(f"{prop.__name__}: {args.examples} examples in {time.monotonic() - t0:.0f}s",
                  flush=True)
    print(f"done: {examples} examples in {time.monotonic() - started:.0f}s, "
          f"{failures} failures", flush=True)
    return 1 if failures else 0
