"""The CRI streaming server over real sockets on 127.0.0.1, with host processes behind it.

The client is tests/cri_stream_client.py (its own SPDY framing, wsproto for WebSocket).
"""

from __future__ import annotations

import functools
import os
import random
import ssl
import struct
import subprocess
import zlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio

from berth.core import errdefs
from berth.plugins.cri.streaming import spdy
from berth.plugins.cri.streaming.server import (
    AttachRequest,
    ExecRequest,
    PortForwardRequest,
    StreamServer,
    StreamServerConfig,
    TokenCache,
    load_key_pair,
)
from tests.cri_stream_client import (
    StreamClientError,
    http_request,
    key_pair,
    spdy_connect,
    spdy_exec,
    spdy_port_forward,
    spdy_remotecommand,
    trusting,
    ws_connect,
    ws_exec,
    ws_remotecommand,
)
from tests.cri_stream_host_runtime import HostRuntime

SCRIPT = ("sh", "-c", "echo out; echo err >&2; exit 3")


@asynccontextmanager
async def serving(**kw: object) -> AsyncIterator[tuple[StreamServer, HostRuntime]]:
    runtime = HostRuntime()
    server = StreamServer(runtime, StreamServerConfig(**kw))  # type: ignore[arg-type]
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve)
        yield server, runtime
        nursery.cancel_scope.cancel()


async def test_spdy_exec_streams_and_exit_code() -> None:
    async with serving() as (server, _):
        res = await spdy_exec(server.get_exec(ExecRequest("c1", SCRIPT)))
        assert (res.stdout, res.stderr, res.exit_code) == (b"out\n", b"err\n", 3)
        assert res.status["reason"] == "NonZeroExitCode"
        ok = await spdy_exec(server.get_exec(ExecRequest("c1", ("true",))))
        assert ok.status == {"metadata": {}, "status": "Success"}


async def test_spdy_older_protocols_report_failure_as_text() -> None:
    async with serving() as (server, _):
        for proto in ("v3.channel.k8s.io", "v2.channel.k8s.io"):
            res = await spdy_exec(server.get_exec(ExecRequest("c1", SCRIPT)),
                                  protocols=[proto])
            assert (res.stdout, res.stderr, res.status) == (b"out\n", b"err\n", None)
            assert b"exit code 3" in res.error_text


async def test_spdy_stdin_half_close() -> None:
    async with serving() as (server, _):
        url = server.get_exec(ExecRequest("c1", ("sh", "-c", "cat; echo done"), stdin=True))
        payload = os.urandom(300_000)
        res = await spdy_exec(url, stdin=payload)
        assert res.stdout == payload + b"done\n"
        assert res.exit_code == 0


async def test_spdy_tty_line_and_resize() -> None:
    async with serving() as (server, _):
        url = server.get_exec(ExecRequest("c1", ("sh",), tty=True, stdin=True, stderr=False))
        async with spdy_remotecommand(url, stdin=True, tty=True) as rc:
            await rc.send_stdin(b"echo typed-$((40+2))\n")
            assert b"typed-42" in await rc.read_stdout_until(b"typed-42")
            await rc.resize(123, 45)
            await _see_size(rc, b"45 123")
            await rc.send_stdin(b"exit 7\n")
            res = await rc.finish()
        assert res.exit_code == 7


async def test_ws_exec_every_protocol() -> None:
    async with serving() as (server, _):
        for proto in ("v5.channel.k8s.io", "v4.channel.k8s.io", "v4.base64.channel.k8s.io"):
            res = await ws_exec(server.get_exec(ExecRequest("c1", SCRIPT)), proto)
            assert (res.stdout, res.stderr, res.exit_code) == (b"out\n", b"err\n", 3), proto
        for proto in ("channel.k8s.io", "base64.channel.k8s.io"):
            res = await ws_exec(server.get_exec(ExecRequest("c1", SCRIPT)), proto)
            assert (res.stdout, res.stderr, res.status) == (b"out\n", b"err\n", None), proto
            assert b"exit code 3" in res.error_text


async def test_ws_v5_close_signal_ends_stdin() -> None:
    async with serving() as (server, _):
        url = server.get_exec(ExecRequest("c1", ("sh", "-c", "wc -c"), stdin=True))
        res = await ws_exec(url, "v5.channel.k8s.io", stdin=b"x" * 100_000)
        assert res.stdout.strip() == b"100000"
        assert res.exit_code == 0


async def test_ws_tty_resize() -> None:
    async with serving() as (server, _):
        url = server.get_exec(ExecRequest("c1", ("sh",), tty=True, stdin=True, stderr=False))
        async with ws_remotecommand(url) as rc:
            await rc.send_stdin(b"echo typed-$((40+2))\n")
            await rc.read_stdout_until(b"typed-42")
            await rc.resize(91, 17)
            await _see_size(rc, b"17 91")
            await rc.send_stdin(b"exit 0\n")
            res = await rc.finish()
        assert res.exit_code == 0


async def test_attach_spdy_and_ws() -> None:
    async with serving() as (server, runtime):
        runtime.attach_process = await trio.lowlevel.open_process(
            ["sh", "-c", "echo ready; read line; echo got-$line"], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE)
        url = server.get_attach(AttachRequest("c1", stdin=True, stderr=False))
        async with spdy_remotecommand(url, stdin=True, stderr=False) as rc:
            await rc.read_stdout_until(b"ready")
            await rc.send_stdin(b"hello\n")
            res = await rc.finish()
        assert res.stdout == b"ready\ngot-hello\n" and res.exit_code == 0
        runtime.attach_process = await trio.lowlevel.open_process(
            ["sh", "-c", "echo ready; read line; echo got-$line"], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE)
        url = server.get_attach(AttachRequest("c1", stdin=True, stderr=False))
        async with ws_remotecommand(url, stderr=False) as rc:
            await rc.read_stdout_until(b"ready")
            await rc.send_stdin(b"there\n")
            res = await rc.finish()
        assert res.stdout == b"ready\ngot-there\n" and res.exit_code == 0


async def _echo_server(nursery: trio.Nursery) -> int:
    async def echo(s: trio.SocketStream) -> None:
        async with s:
            while data := await s.receive_some(65536):
                await s.send_all(data)
    listeners = await nursery.start(functools.partial(trio.serve_tcp, echo, 0,
                                                      host="127.0.0.1"))
    return listeners[0].socket.getsockname()[1]


async def test_spdy_port_forward_many_connections() -> None:
    async with serving() as (server, runtime), trio.open_nursery() as nursery:
        port = await _echo_server(nursery)
        url = server.get_port_forward(PortForwardRequest("pod1"))
        async with spdy_connect(url, ["portforward.k8s.io"]) as (c, proto):
            assert proto == "portforward.k8s.io"
            for i in range(20):
                payload = os.urandom(1000 + i)
                got, errors = await spdy_port_forward(c, port, i, payload)
                assert (got, errors) == (payload, b"")
            big = [os.urandom(1_000_000) for _ in range(5)]
            results: dict[int, bytes] = {}

            async def one(i: int) -> None:
                results[i], _ = await spdy_port_forward(c, port, 100 + i, big[i])
            async with trio.open_nursery() as inner:
                for i in range(5):
                    inner.start_soon(one, i)
            assert all(results[i] == big[i] for i in range(5))
            # A closed port: the error stream says so, the connection lives on.
            got, errors = await spdy_port_forward(c, 1, 999, b"x")
            assert got == b"" and b"error forwarding port 1" in errors
        assert runtime.forwarded[0] == ("pod1", port)
        nursery.cancel_scope.cancel()


async def test_ws_port_forward() -> None:
    async with serving() as (server, _), trio.open_nursery() as nursery:
        port = await _echo_server(nursery)
        payload = os.urandom(1_000_000)
        for proto in ("v4.channel.k8s.io", "v4.base64.channel.k8s.io"):
            url = server.get_port_forward(PortForwardRequest("pod1", (port,)))
            async with ws_connect(url, [proto], nch=2) as c:
                await c.read_until(1, lambda d: len(d) >= 2)
                assert bytes(c.bufs[1][:2]) == struct.pack("<H", port)
                await c.send(0, payload)
                got = await c.read_until(0, lambda d: len(d) >= 2 + len(payload))
                assert got == struct.pack("<H", port) + payload
        nursery.cancel_scope.cancel()


async def test_tokens_one_time_bound_and_expiring() -> None:
    now = [0.0]
    cache = TokenCache(ttl=60, max_tokens=3, clock=lambda: now[0])
    t = cache.insert("exec", "req")
    assert cache.consume("attach", t) is None  # wrong kind: gone too
    assert cache.consume("exec", t) is None
    t = cache.insert("exec", "req")
    now[0] = 61
    assert cache.consume("exec", t) is None
    for _ in range(3):
        cache.insert("exec", "x")
    with pytest.raises(Exception, match="in-flight"):
        cache.insert("exec", "x")
    now[0] = 200
    cache.insert("exec", "x")  # expired ones are pruned


async def test_expired_reused_and_foreign_tokens_get_404() -> None:
    async with serving() as (server, _):
        now = [0.0]
        server.tokens = TokenCache(clock=lambda: now[0])
        url = server.get_exec(ExecRequest("c1", ("true",)))
        assert (await spdy_exec(url)).exit_code == 0
        with pytest.raises(StreamClientError, match="404"):
            await spdy_exec(url)
        url = server.get_exec(ExecRequest("c1", ("true",)))
        now[0] = 61
        with pytest.raises(StreamClientError, match="404"):
            await spdy_exec(url)
        now[0] = 0
        url = server.get_exec(ExecRequest("c1", ("true",)))
        with pytest.raises(StreamClientError, match="404"):
            await spdy_exec(url.replace("/exec/", "/attach/"))
        with pytest.raises(StreamClientError, match="404"):
            await spdy_exec(url)
        # The URL's query cannot change what a token runs.
        url = server.get_exec(ExecRequest("c1", ("echo", "mine")))
        res = await spdy_exec(url + "?command=echo&command=theirs")
        assert res.stdout == b"mine\n"


async def test_upgrade_negotiation_errors() -> None:
    async with serving() as (server, _):
        url = server.get_exec(ExecRequest("c1", ("true",)))
        reply, s, _ = await http_request(url, [("Connection", "Upgrade"),
                                               ("Upgrade", "SPDY/3.1"),
                                               ("X-Stream-Protocol-Version", "v9.nope")])
        await s.aclose()
        assert reply.status == 403
        assert "v4.channel.k8s.io" in reply.headers["x-accepted-stream-protocol-versions"][0]
        url = server.get_exec(ExecRequest("c1", ("true",)))
        reply, s, _ = await http_request(url, [])
        await s.aclose()
        assert reply.status == 400 and b"missing upgrade headers" in reply.body


async def garbage_after_upgrade(url: str, garbage: bytes) -> bytes:
    """Upgrade an exec URL to SPDY, send garbage, read what comes back until the close."""
    reply, s, rest = await http_request(url, [("Connection", "Upgrade"), ("Upgrade", "SPDY/3.1"),
                                              ("X-Stream-Protocol-Version", "v4.channel.k8s.io")])
    assert reply.status == 101
    got = bytearray(rest)
    async with s:
        try:
            await s.send_all(garbage)
        except trio.BrokenResourceError:
            return bytes(got)
        with trio.fail_after(30):
            while True:
                try:
                    data = await s.receive_some(65536)
                except trio.BrokenResourceError:
                    break
                if not data:
                    break
                got += data
    return bytes(got)


def _syn(block: bytes) -> bytes:
    payload = struct.pack(">IIBB", 1, 0, 0, 0) + block
    return struct.pack(">HHI", 0x8003, 1, len(payload)) + payload


def garbage_cases() -> dict[str, bytes]:
    """What a client may send after the upgrade that is no SPDY a server should take."""
    z = zlib.compressobj(9, zlib.DEFLATED, 15, 8, zlib.Z_DEFAULT_STRATEGY, spdy.DICTIONARY)
    bomb = z.compress(struct.pack(">II", 1, 1) + b"x" + struct.pack(">I", 100_000_000)
                      + b"A" * 100_000_000) + z.flush(zlib.Z_SYNC_FLUSH)
    rng = random.Random(7)
    return {
        "random": bytes(rng.getrandbits(8) for _ in range(4096)),
        "huge length": struct.pack(">HHI", 0x8003, 1, 0xFFFFFF) + b"\0" * 100,
        "no inflate": _syn(b"\x78\xbb" + b"\xfe" * 64),
        "zip bomb": _syn(bomb),
    }


def ends_in_goaway(got: bytes) -> bool:
    """What came back, if anything, ends in a GOAWAY with PROTOCOL_ERROR."""
    return not got or got[-16:-4] == struct.pack(">HHII", 0x8003, 7, 8, 0)[:12]


async def test_garbage_after_upgrade_closes_only_that_connection() -> None:
    async with serving() as (server, _):
        for name, garbage in garbage_cases().items():
            url = server.get_exec(ExecRequest("c1", ("sleep", "30")))
            assert ends_in_goaway(await garbage_after_upgrade(url, garbage)), name
            res = await spdy_exec(server.get_exec(ExecRequest("c1", SCRIPT)))
            assert res.exit_code == 3, name


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def test_idle_connections_are_bounded() -> None:
    async with serving(max_pending=32) as (server, _):
        base = _fds()
        idle = [await trio.open_tcp_stream("127.0.0.1", server.port) for _ in range(200)]
        await trio.sleep(0.2)
        # 200 client sockets are ours; the server keeps at most max_pending of its own.
        assert _fds() - base <= 200 + 32 + 4
        res = await spdy_exec(server.get_exec(ExecRequest("c1", SCRIPT)))
        assert res.exit_code == 3
        for s in idle:
            await s.aclose()


async def test_tls_self_signed(tmp_path) -> None:  # noqa: ANN001
    async with serving(tls=True, state_dir=str(tmp_path)) as (server, _):
        url = server.get_exec(ExecRequest("c1", SCRIPT))
        assert url.startswith("https://127.0.0.1:")
        res = await spdy_exec(url)
        assert res.exit_code == 3 and res.stdout == b"out\n"
        res = await ws_exec(server.get_exec(ExecRequest("c1", SCRIPT)))
        assert res.exit_code == 3


async def test_tls_with_a_given_key_pair(tmp_path) -> None:  # noqa: ANN001
    """x509_key_pair_streaming: the server shows that certificate, so a client trusting it
    alone (names checked) completes an exec; the same client refuses the self-signed one."""
    cert, key = key_pair(tmp_path, "given")
    trust = trusting(cert)
    async with serving(tls=True, tls_cert_file=str(cert), tls_key_file=str(key),
                       state_dir=str(tmp_path / "self")) as (server, _):
        res = await spdy_exec(server.get_exec(ExecRequest("c1", SCRIPT)), tls=trust)
        assert (res.stdout, res.stderr, res.exit_code) == (b"out\n", b"err\n", 3)
        res = await ws_exec(server.get_exec(ExecRequest("c1", SCRIPT)), tls=trust)
        assert res.exit_code == 3
    assert not (tmp_path / "self").exists()  # nothing self-signed was made
    async with serving(tls=True, state_dir=str(tmp_path / "self")) as (server, _):
        with pytest.raises(trio.BrokenResourceError) as err:
            await spdy_exec(server.get_exec(ExecRequest("c1", SCRIPT)), tls=trust)
        assert isinstance(err.value.__cause__, ssl.SSLCertVerificationError)


def test_a_key_pair_that_does_not_load_is_named(tmp_path) -> None:  # noqa: ANN001
    cert, key = key_pair(tmp_path, "one")
    _, other_key = key_pair(tmp_path, "two")
    _, locked_key = key_pair(tmp_path, "locked", passphrase="secret")
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
    for c, k, why in ((tmp_path / "missing.crt", key, "no PEM certificate"),
                      (garbage, key, "no PEM certificate"),
                      (cert, tmp_path / "missing.key", "not the PEM private key"),
                      (cert, other_key, "not the PEM private key"),
                      (cert, garbage, "not the PEM private key"),
                      (cert, locked_key, "encrypted"),
                      (cert, "", "both files")):
        with pytest.raises(errdefs.InvalidArgument,
                           match="failed to load x509 key pair for stream server") as err:
            load_key_pair(str(c), str(k))
        assert why in str(err.value), (c, k)
    # The server refuses to start on one, rather than serve another certificate.
    server = StreamServer(HostRuntime(), StreamServerConfig(
        tls=True, tls_cert_file=str(cert), tls_key_file=str(other_key),
        state_dir=str(tmp_path / "self")))
    with pytest.raises(errdefs.InvalidArgument, match="x509 key pair"):
        trio.run(server.serve)
    assert not (tmp_path / "self").exists()


async def test_idle_upgraded_connection_is_closed() -> None:
    async with serving(idle_timeout=0.3) as (server, _):
        url = server.get_exec(ExecRequest("c1", ("true",)))
        reply, s, _ = await http_request(url, [("Connection", "Upgrade"), ("Upgrade", "SPDY/3.1"),
                                               ("X-Stream-Protocol-Version", "v4.channel.k8s.io")])
        assert reply.status == 101
        async with s:
            with trio.fail_after(30):
                while await s.receive_some(4096):
                    pass
        assert server.active == 0


async def test_websocket_garbage_closes_only_that_connection() -> None:
    rng = random.Random(11)
    async with serving() as (server, _):
        for garbage in (bytes(rng.getrandbits(8) for _ in range(4096)),
                        b"\x82\x7f" + b"\xff" * 8,  # a frame claiming 2^64-1 bytes
                        b"\x81\x85" + b"\0\0\0\0" + b"\xff\xfe\xfd\xfc\xfb"):  # text, not UTF-8
            url = server.get_exec(ExecRequest("c1", ("sleep", "30")))
            async with ws_connect(url, ["v5.channel.k8s.io"]) as c:
                with trio.fail_after(30):
                    await c.stream.send_all(garbage)
                    await c.closed.wait()
            res = await ws_exec(server.get_exec(ExecRequest("c1", SCRIPT)))
            assert res.exit_code == 3


async def _see_size(rc, needle: bytes) -> None:  # type: ignore[no-untyped-def]
    """Ask ``stty size`` until the resize has landed: the resize and stdin streams are
    separate, so the first ask may run before the terminal changed (the kubelet's race too)."""
    for _ in range(100):
        await rc.send_stdin(b"stty size\n")
        with trio.move_on_after(0.5):
            await rc.read_stdout_until(needle)
            return
    raise AssertionError(f"terminal never showed {needle!r}")


async def test_client_hanging_up_ends_its_exec() -> None:
    async with serving() as (server, _):
        for connect in ("spdy", "ws"):
            url = server.get_exec(ExecRequest("c1", ("sleep", "1000")))
            if connect == "spdy":
                async with spdy_remotecommand(url) as rc:
                    await trio.sleep(0.2)
            else:
                async with ws_remotecommand(url) as rc:
                    await trio.sleep(0.2)
            del rc
            with trio.fail_after(30):
                while server.active:
                    await trio.sleep(0.05)
