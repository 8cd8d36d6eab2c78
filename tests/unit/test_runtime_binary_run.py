"""The shim start action's process runner (``berth.core.runtime.binary._run_combined``):
what trio.run_process gave it, without the worker thread."""

from __future__ import annotations

import os
import signal

import pytest
import trio

from berth.core.runtime.binary import _run_combined


async def test_stdin_fed_output_combined_and_exit_code(tmp_path) -> None:
    code, out = await _run_combined(
        ["/bin/sh", "-c", 'read line; echo "got $line $(pwd)"; echo err >&2; exit 3'],
        cwd=str(tmp_path), env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
        stdin=b"options\n")
    assert code == 3
    assert out == f"got options {tmp_path}\nerr\n".encode()


async def test_empty_stdin_reads_as_end_of_file(tmp_path) -> None:
    code, out = await _run_combined(["/bin/sh", "-c", "cat; echo done"], cwd=str(tmp_path),
                                    env={}, stdin=b"")
    assert (code, out) == (0, b"done\n")


async def test_large_stdin_is_fed_while_output_is_read(tmp_path) -> None:
    data = b"x" * (1 << 20)  # more than a pipe holds
    code, out = await _run_combined(["/bin/cat"], cwd=str(tmp_path), env={}, stdin=data)
    assert (code, out) == (0, data)


async def test_child_runs_in_its_own_process_group(tmp_path) -> None:
    code, out = await _run_combined(["/bin/sh", "-c", "ps -o pgid= -p $$; echo $$"],
                                    cwd=str(tmp_path), env={"PATH": "/usr/bin:/bin"},
                                    stdin=b"")
    pgid, pid = out.split()
    assert code == 0 and pgid == pid and int(pgid) != os.getpgrp()


async def test_signal_exit_is_negative(tmp_path) -> None:
    code, _ = await _run_combined(["/bin/sh", "-c", "kill -KILL $$"], cwd=str(tmp_path),
                                  env={}, stdin=b"")
    assert code == -signal.SIGKILL


async def test_missing_binary_raises_oserror(tmp_path) -> None:
    with pytest.raises(FileNotFoundError):
        await _run_combined([str(tmp_path / "nope")], cwd=str(tmp_path), env={}, stdin=b"")


async def test_cancel_terminates_and_reaps(tmp_path) -> None:
    pidfile = tmp_path / "pid"
    with trio.move_on_after(10) as outer:
        with trio.CancelScope() as scope:
            async def cancel_once_started() -> None:
                while not pidfile.exists() or not pidfile.read_text().strip():
                    await trio.sleep(0.01)
                scope.cancel()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(cancel_once_started)
                await _run_combined(["/bin/sh", "-c", f"echo $$ > {pidfile}; exec sleep 100"],
                                    cwd=str(tmp_path), env={"PATH": "/usr/bin:/bin"},
                                    stdin=b"")
    assert not outer.cancelled_caught
    assert scope.cancelled_caught
    pid = int(pidfile.read_text())
    # Reaped: the pid is no child of ours any more.
    with pytest.raises(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)
