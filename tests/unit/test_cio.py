"""Client-side stdio: FIFO sets (names, cleanup), copying through them, terminals.

A test plays the shim's part with plain file descriptors on the FIFOs. The copier is
asyncio code (the CLI's), so these are sync tests that run their own event loop.
"""

from __future__ import annotations

import asyncio
import os
import signal
import stat
import struct
import termios
from pathlib import Path

import pytest

from berth.core.client import cio


def run(coro):  # noqa: ANN001, ANN201 - a tiny helper
    return asyncio.run(asyncio.wait_for(coro, 30))


def test_new_fifo_set_names_and_cleanup(tmp_path: Path) -> None:
    root = tmp_path / "fifo"
    fifos = cio.new_fifo_set(str(root), "c1")
    assert stat.S_IMODE(root.stat().st_mode) == 0o700
    d = Path(fifos.directory or "")
    assert d.parent == root and stat.S_IMODE(d.stat().st_mode) == 0o700
    assert (fifos.stdin, fifos.stdout, fifos.stderr) == (
        str(d / "c1-stdin"), str(d / "c1-stdout"), str(d / "c1-stderr"))
    assert fifos.terminal is False
    other = cio.new_fifo_set(str(root), "c1")
    assert other.directory != fifos.directory  # a fresh directory per set
    for p in fifos.paths():
        cio.make_fifo(p)
        cio.make_fifo(p)  # already there: fine
        assert cio.is_fifo(p)
    fifos.close()
    assert not d.exists()
    assert Path(other.directory or "").exists()
    other.close()
    assert list(root.iterdir()) == []


def test_terminal_and_partial_sets(tmp_path: Path) -> None:
    t = cio.new_fifo_set(str(tmp_path), "e1", terminal=True)
    assert t.terminal and t.stderr == "" and t.stdin.endswith("/e1-stdin")
    n = cio.new_fifo_set(str(tmp_path), "e2", stdin=False)
    assert n.stdin == "" and n.paths() == [n.stdout, n.stderr]


def test_make_fifo_refuses_a_regular_file(tmp_path: Path) -> None:
    f = tmp_path / "x"
    f.write_text("")
    with pytest.raises(FileExistsError):
        cio.make_fifo(str(f))


def test_loaded_set_removes_fifos_then_empty_dirs(tmp_path: Path) -> None:
    made = cio.new_fifo_set(str(tmp_path), "c1")
    for p in made.paths():
        cio.make_fifo(p)
    loaded = cio.loaded_fifo_set(made.stdin, made.stdout, made.stderr)
    assert loaded.directory is None
    loaded.close()
    assert not Path(made.directory or "").exists()
    # A directory holding something else keeps it (and itself).
    keep = tmp_path / "keep"
    keep.mkdir()
    (keep / "note").write_text("mine")
    cio.make_fifo(str(keep / "x-stdout"))
    cio.loaded_fifo_set("", str(keep / "x-stdout"), "/nonexistent/x-stderr").close()
    assert [p.name for p in keep.iterdir()] == ["note"]
    # Paths that are not FIFOs (file:// logs, binary:// URIs) are never touched.
    log = tmp_path / "log"
    log.write_text("x")
    cio.loaded_fifo_set("", str(log), "binary:///bin/logger").close()
    assert log.exists()


def test_outputs_are_copied_until_the_shim_closes(tmp_path: Path) -> None:
    fifos = cio.new_fifo_set(str(tmp_path), "c1", stdin=False)
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()

    async def main() -> None:
        async with cio.Copier(fifos, stdin=None, stdout=out_w, stderr=err_w) as io:
            # Before any writer came, nothing is read as EOF.
            waiter = asyncio.ensure_future(io.wait())
            await asyncio.sleep(0.05)
            assert not waiter.done()
            w1 = os.open(fifos.stdout, os.O_WRONLY)
            w2 = os.open(fifos.stderr, os.O_WRONLY)
            big = b"x" * 200_000  # more than a FIFO holds
            os.set_blocking(w1, False)

            async def write_big() -> None:
                view = memoryview(big)
                while view:
                    try:
                        view = view[os.write(w1, view):]
                    except BlockingIOError:
                        await asyncio.sleep(0.001)
                os.close(w1)

            async def drain() -> bytes:
                got = b""
                os.set_blocking(out_r, False)
                while len(got) < len(big):
                    try:
                        got += os.read(out_r, 65536)
                    except BlockingIOError:
                        await asyncio.sleep(0.001)
                return got

            _, got = await asyncio.gather(write_big(), drain())
            assert got == big
            os.write(w2, b"oops\n")
            os.close(w2)
            await waiter
        assert os.read(err_r, 100) == b"oops\n"

    run(main())
    for fd in (out_r, out_w, err_r, err_w):
        os.close(fd)


@pytest.mark.parametrize("shim_first", [True, False])
def test_stdin_is_copied_then_closed(tmp_path: Path, shim_first: bool) -> None:
    """The shim may open the stdin FIFO before or after we do (helper-thread path)."""
    fifos = cio.new_fifo_set(str(tmp_path), "c1", stdout=False, stderr=False)
    src_r, src_w = os.pipe()
    closed: list[bool] = []

    async def close_stdin() -> None:
        closed.append(True)

    async def main() -> bytes:
        async with cio.Copier(fifos, stdin=src_r, stdout=None, stderr=None) as io:
            reader = None
            if shim_first:
                reader = os.open(fifos.stdin, os.O_RDONLY | os.O_NONBLOCK)
            io.attach_stdin(close_stdin)
            os.write(src_w, b"hello ")
            await asyncio.sleep(0.05)
            if reader is None:
                reader = os.open(fifos.stdin, os.O_RDONLY | os.O_NONBLOCK)
            os.write(src_w, b"world")
            os.close(src_w)
            await asyncio.wait_for(io.stdin_closed.wait(), 10)
            got = b""
            while True:
                try:
                    chunk = os.read(reader, 100)
                except BlockingIOError:
                    await asyncio.sleep(0.01)
                    continue
                if not chunk:
                    break  # our writer is closed: EOF
                got += chunk
            os.close(reader)
            await asyncio.sleep(0)
            return got

    assert run(main()) == b"hello world"
    assert closed == [True]
    os.close(src_r)


def test_stdin_from_a_regular_file(tmp_path: Path) -> None:
    fifos = cio.new_fifo_set(str(tmp_path), "c1", stdout=False, stderr=False)
    src = tmp_path / "input"
    src.write_bytes(b"line\n" * 1000)

    async def main() -> bytes:
        fd = os.open(src, os.O_RDONLY)
        try:
            async with cio.Copier(fifos, stdin=fd, stdout=None, stderr=None) as io:
                reader = os.open(fifos.stdin, os.O_RDONLY | os.O_NONBLOCK)
                io.attach_stdin()
                await asyncio.wait_for(io.stdin_closed.wait(), 10)
                data = os.read(reader, 100_000)
                os.close(reader)
                return data
        finally:
            os.close(fd)

    assert run(main()) == b"line\n" * 1000


def test_giving_up_on_a_shim_that_never_reads_stdin(tmp_path: Path) -> None:
    fifos = cio.new_fifo_set(str(tmp_path), "c1", stdout=False, stderr=False)
    src_r, src_w = os.pipe()

    async def main() -> None:
        async with cio.Copier(fifos, stdin=src_r, stdout=None, stderr=None) as io:
            io.attach_stdin()
            await asyncio.sleep(0.05)  # the helper thread now waits in open(2)
        # Leaving released it: nothing of ours holds the FIFO any more.
        assert not io.stdin_closed.is_set()

    run(main())
    import threading

    assert not [t for t in threading.enumerate() if t.name.startswith("fifo-open")]
    fifos.close()
    os.close(src_r)
    os.close(src_w)


def test_make_raw_is_cfmakeraw() -> None:
    master, slave = os.openpty()
    try:
        attrs = termios.tcgetattr(slave)
        raw = cio.make_raw(attrs)
        assert not raw[0] & (termios.ICRNL | termios.IXON | termios.BRKINT)
        assert not raw[1] & termios.OPOST
        assert not raw[3] & (termios.ECHO | termios.ICANON | termios.ISIG | termios.IEXTEN)
        assert raw[2] & termios.CSIZE == termios.CS8
        assert raw[6][termios.VMIN] == 1 and raw[6][termios.VTIME] == 0
    finally:
        os.close(master)
        os.close(slave)


def test_raw_terminal_restores() -> None:
    master, slave = os.openpty()
    try:
        before = termios.tcgetattr(slave)
        assert before[3] & termios.ECHO
        with cio.raw_terminal(slave):
            assert not termios.tcgetattr(slave)[3] & termios.ECHO
        assert termios.tcgetattr(slave) == before
        with pytest.raises(RuntimeError), cio.raw_terminal(slave):
            raise RuntimeError("boom")
        assert termios.tcgetattr(slave) == before
        with cio.raw_terminal(None):  # not a terminal: nothing to do
            pass
    finally:
        os.close(master)
        os.close(slave)


def _set_size(fd: int, rows: int, cols: int) -> None:
    import fcntl

    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


def test_resizes_follow_sigwinch() -> None:
    master, slave = os.openpty()
    sizes: list[tuple[int, int]] = []

    async def main() -> None:
        got = asyncio.Event()

        async def resize(w: int, h: int) -> None:
            sizes.append((w, h))
            got.set()

        _set_size(slave, 24, 80)
        task = asyncio.ensure_future(cio.forward_resizes(slave, resize))
        await got.wait()
        got.clear()
        _set_size(slave, 50, 132)
        os.kill(os.getpid(), signal.SIGWINCH)
        await got.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    try:
        run(main())
    finally:
        os.close(master)
        os.close(slave)
    assert sizes == [(80, 24), (132, 50)]
    assert signal.getsignal(signal.SIGWINCH) in (signal.SIG_DFL, None)
