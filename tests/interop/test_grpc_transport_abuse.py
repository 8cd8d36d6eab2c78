"""HTTP/2 abuse of berthd's gRPC socket (issue 8.5): memory stays flat, junk is dropped.

Raw bytes over the unix socket, as an attacker would send them; each test ends by
checking that berthd still answers the real ctr.
"""

from __future__ import annotations

import random
import socket
import struct
from pathlib import Path

import h2.config
import h2.connection
import pytest

from tests import daemons
from tests.daemons import Daemon

pytestmark = pytest.mark.interop

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
SETTINGS = b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"  # an empty SETTINGS frame
GOAWAY = 0x7


def vm_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def frame_header(length: int, ftype: int, flags: int, sid: int) -> bytes:
    return length.to_bytes(3, "big") + bytes([ftype, flags]) + struct.pack(">I", sid)


def frames(data: bytes) -> list[tuple[int, int, bytes]]:
    """(type, stream, payload) of each whole frame in ``data``."""
    out, i = [], 0
    while i + 9 <= len(data):
        length = int.from_bytes(data[i:i + 3], "big")
        out.append((data[i + 3], int.from_bytes(data[i + 5:i + 9], "big") & 0x7FFFFFFF,
                    data[i + 9:i + 9 + length]))
        i += 9 + length
    return out


def read_until_closed(sock: socket.socket) -> bytes:
    """Everything the server sends until it hangs up; the socket timeout bounds it."""
    got = b""
    try:
        while chunk := sock.recv(1 << 16):
            got += chunk
    except ConnectionResetError:
        pass
    return got


def connect(d: Daemon, timeout: float = 20) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX)
    sock.settimeout(timeout)
    sock.connect(str(d.address))
    return sock


def assert_serving(d: Daemon) -> None:
    assert d.proc is not None and d.proc.poll() is None, d.logs()[-2000:]
    daemons.ctr_ok(d.address, "version")


def test_huge_frames_do_not_grow_memory(berthd: Daemon) -> None:
    assert berthd.proc is not None
    daemons.ctr_ok(berthd.address, "namespaces", "ls")  # everything imported and warm
    before = vm_rss_kib(berthd.proc.pid)
    socks = [connect(berthd) for _ in range(10)]
    try:
        body = bytes(1 << 20)
        for s in socks:
            # A HEADERS frame announcing 16 MiB - 1, far over the 16 KiB maximum that
            # berthd advertises, and most of its body (if the server still reads it).
            s.sendall(PREFACE + SETTINGS + frame_header((1 << 24) - 1, 0x1, 0x4, 1))
            try:
                for _ in range(15):
                    s.sendall(body)
            except (BrokenPipeError, ConnectionResetError):
                pass  # refused at the frame header: what we want
        for s in socks:
            got = read_until_closed(s)
            goaway = [p for t, sid, p in frames(got) if t == GOAWAY]
            assert goaway, got[:200]
            assert int.from_bytes(goaway[0][4:8], "big") == 0x6  # FRAME_SIZE_ERROR
        after = vm_rss_kib(berthd.proc.pid)
    finally:
        for s in socks:
            s.close()
    # 10 connections x 15 MiB would be 150 MiB if the bodies were kept.
    assert after - before < 20 * 1024, (before, after)
    assert_serving(berthd)


@pytest.mark.parametrize("opening", [
    b"",  # nothing at all
    PREFACE,  # a preface and then silence
    PREFACE + bytes(random.Random(8).getrandbits(8) for _ in range(64)),  # junk after it
    PREFACE + frame_header(0, 0x6, 0, 0) + bytes(8),  # a PING before SETTINGS
    b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",  # not HTTP/2 at all
])
def test_connections_without_a_handshake_are_closed(berthd: Daemon, opening: bytes) -> None:
    s = connect(berthd, timeout=10)  # bounds the wait: the server should close at ~1 s
    try:
        s.sendall(opening)
        read_until_closed(s)  # returns once berthd hangs up; a timeout fails the test
    finally:
        s.close()
    assert_serving(berthd)


def test_a_good_connection_stays_open_when_idle(berthd: Daemon) -> None:
    # The handshake timeout only applies before the client's SETTINGS.
    s = connect(berthd, timeout=2.5)
    try:
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        conn.initiate_connection()
        s.sendall(conn.data_to_send())
        with pytest.raises(TimeoutError):
            while s.recv(1 << 16):
                pass
    finally:
        s.close()


def test_protocol_errors_get_a_goaway(berthd: Daemon) -> None:
    s = connect(berthd, timeout=10)
    try:
        # DATA on stream 0 is a connection error (RFC 9113 6.1).
        s.sendall(PREFACE + SETTINGS + frame_header(4, 0x0, 0, 0) + b"abcd")
        got = read_until_closed(s)
    finally:
        s.close()
    assert any(t == GOAWAY for t, _, _ in frames(got)), got[:200]
    assert_serving(berthd)
