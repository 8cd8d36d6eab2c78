"""Fuzz berth's ttrpc server (berthd's ttrpc socket) and a shim's socket: arbitrary
frames, lengths, stream ids, message types and bytes, and well-framed requests with
arbitrary services, methods, metadata, timeouts and payloads. After each example the
server must have hung up or answered (no hang, no exception past its boundary) and must
answer a well-formed call on a new connection.

The shim's side is berth's real ``TaskService`` behind the ttrpc server, minus the part
of Create that touches the host (a fuzzed bundle path and rootfs mounts are not
something to try on a shared machine): Create answers FailedPrecondition here.

    python -m tests.fuzz.ttrpc_server --hours 2
"""

from __future__ import annotations

import shutil
import struct
import sys
import tempfile
from pathlib import Path
from typing import Any

import trio
from betterproto.lib.google.protobuf import Empty
from hypothesis import given, strategies as st

from berth.core import errdefs
from berth.core.api.containerd.task.v2 import StateRequest
from berth.core.oci.reaper import Reaper
from berth.core.shim.publisher import Publisher
from berth.core.shim.service import TASK_SERVICE, TaskService
from berth.core.ttrpc import codec
from berth.core.ttrpc.client import open_client
from berth.core.ttrpc.server import Method, Server
from tests.fuzz import harness

ECHO = "berth.fuzz.v1.Echo"
BOUNDARY_EVENTS = ("ttrpc: connection failed", "ttrpc: handler raised")


async def _echo(ctx: Any, req: Empty) -> Empty:
    await trio.sleep(0)
    return Empty()


class _NoCreate(TaskService):
    async def create(self, ctx: Any, req: Any) -> Any:
        raise errdefs.FailedPrecondition("create is not fuzzed")


def frame(length: int | None, sid: int, mtype: int, flags: int, payload: bytes) -> bytes:
    n = len(payload) if length is None else length
    return struct.pack(">IIBB", n & 0xFFFFFFFF, sid & 0xFFFFFFFF, mtype, flags) + payload


async def _serve_and(target: str, body: Any) -> None:
    """Serve ``target`` ("ttrpc" or "shim") on a fresh socket and run ``body(path)``."""
    base = Path(tempfile.mkdtemp(prefix="berth-fz-", dir="/tmp"))
    path = str(base / "s.sock")
    try:
        async with trio.open_nursery() as nursery:
            server = Server()
            server.register(ECHO, {"Echo": Method(Empty, _echo)})
            if target == "shim":
                service = _NoCreate(
                    namespace="fuzz", publisher=Publisher("", "fuzz"),
                    reaper=Reaper(subreaper=False), nursery=nursery,
                    state_base=str(base / "state"), shutdown=lambda: None, watch_oom=False)
                server.register(TASK_SERVICE, service.methods())
            await nursery.start(server.serve_unix, path)
            await body(path)
            nursery.cancel_scope.cancel()
    finally:
        shutil.rmtree(base, ignore_errors=True)


async def _exchange(path: str, data: bytes, chunks: int) -> None:
    stream = await trio.open_unix_socket(path)
    async with stream:
        step = max(1, len(data) // chunks)
        try:
            for i in range(0, len(data), step):
                await stream.send_all(data[i:i + step])
            await stream.send_eof()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        try:
            while await stream.receive_some(1 << 16):
                pass
        except trio.BrokenResourceError:
            pass


async def _good_calls(path: str, target: str) -> None:
    async with open_client(path) as client:
        await client.call(ECHO, "Echo", Empty(), Empty, timeout=harness.EXCHANGE_TIMEOUT)
        if target == "shim":
            try:
                await client.call(TASK_SERVICE, "State", StateRequest(id="nope"), Empty,
                                  timeout=harness.EXCHANGE_TIMEOUT)
            except errdefs.NotFound:
                pass
            else:
                raise AssertionError("State of an unknown container answered")


def check(target: str, data: bytes, chunks: int = 1) -> None:
    async def body(path: str) -> None:
        with trio.fail_after(harness.EXCHANGE_TIMEOUT):
            with harness.no_bugs(*BOUNDARY_EVENTS):
                await _exchange(path, data, chunks)
            await _good_calls(path, target)

    async def run() -> None:
        await _serve_and(target, body)
    trio.run(run)


services = st.sampled_from([ECHO, TASK_SERVICE, "containerd.services.events.ttrpc.v1.Events",
                            ""]) | st.text(max_size=30)
methods = st.sampled_from(["Echo", "State", "Create", "Start", "Delete", "Kill", "Exec",
                           "Wait", "Stats", "Pids", "Connect", "Shutdown", "ResizePty",
                           "CloseIO", "Update", "Pause", "Forward"]) | st.text(max_size=20)
requests = st.builds(
    codec.CallRequest,
    service=services, method=methods, payload=st.binary(max_size=300),
    timeout_nano=st.sampled_from([0, 1, 10**9]) | st.integers(-2**63, 2**63 - 1),
    metadata=st.lists(st.tuples(st.text(max_size=20), st.text(max_size=20)), max_size=3),
)
stream_ids = st.sampled_from([0, 1, 2, 3, 5, 2**31 - 1, 2**32 - 1]) | st.integers(0, 2**32 - 1)
message_types = st.sampled_from([codec.MESSAGE_TYPE_REQUEST, codec.MESSAGE_TYPE_RESPONSE,
                                 codec.MESSAGE_TYPE_DATA]) | st.integers(0, 255)
payloads = st.builds(codec.encode_request, requests) | st.binary(max_size=300)
lengths = st.none() | st.integers(0, 2**32 - 1)
frames = st.builds(frame, length=st.just(None) | lengths, sid=stream_ids,
                   mtype=message_types, flags=st.integers(0, 255), payload=payloads)
targets = st.sampled_from(["ttrpc", "shim"])


@given(targets, st.binary(max_size=4096), st.integers(1, 8))
def fuzz_raw_bytes(target: str, data: bytes, chunks: int) -> None:
    check(target, data, chunks)


@given(targets, st.lists(frames, max_size=8), st.integers(1, 8))
def fuzz_frames(target: str, fs: list[bytes], chunks: int) -> None:
    check(target, b"".join(fs), chunks)


@given(targets, st.lists(st.builds(codec.encode_request, requests), min_size=1, max_size=6),
       st.lists(stream_ids, min_size=6, max_size=6))
def fuzz_requests(target: str, reqs: list[bytes], sids: list[int]) -> None:
    check(target, b"".join(codec.encode_frame(sid | 1 if i % 2 else sid, 1, r)
                           for i, (r, sid) in enumerate(zip(reqs, sids, strict=False))))


PROPERTIES = [fuzz_raw_bytes, fuzz_frames, fuzz_requests]

if __name__ == "__main__":
    sys.exit(harness.run_long("ttrpc_server", PROPERTIES))
