"""The runc-compatible CLI wrapper against a fake runtime binary (no root, no containers).

The fake records its argv and answers like runc does: JSON state, ``ps`` pids, a pid
file for create/exec, JSON log lines for errors. Every invocation is a real child
process, spawned with posix_spawn and collected by a real Reaper.
"""

from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path

import pytest
import trio

from berth.core import errdefs
from berth.core.oci import Reaper, Stdio
from berth.plugins.runtimes.ocicli import Runtime, classify, resolve
from berth.plugins.runtimes.ocicli.stats import from_events

FAKE = r'''
import json, os, sys
here = os.path.dirname(os.path.abspath(sys.argv[0]))
args = sys.argv[1:]
with open(os.path.join(here, "calls"), "a") as f:
    f.write(" ".join(args) + "\n")
opts, rest = {}, []
i = 0
while i < len(args):
    a = args[i]
    if a in ("--root", "--log", "--log-format", "--pid-file", "--console-socket", "--bundle",
             "--process", "--resources"):
        opts[a] = args[i + 1]
        i += 2
        continue
    if not a.startswith("--"):
        rest.append(a)
    i += 1
cmd, pos = rest[0], rest[1:]
cid = pos[0] if pos else ""


def fail(msg):
    line = json.dumps({"level": "error", "msg": msg})
    if "--log" in opts:
        with open(opts["--log"], "a") as f:
            f.write(json.dumps({"level": "info", "msg": "starting"}) + "\n" + line + "\n")
    else:
        sys.stderr.write(line + "\n")
    sys.exit(1)


if cmd == "state":
    if cid == "gone":
        fail("container does not exist")
    print(json.dumps({"ociVersion": "1.0.2", "id": cid, "pid": 4242, "status": "running",
                      "bundle": "/b", "created": "2024-01-02T03:04:05.123456789Z",
                      "annotations": {"k": "v"}}))
elif cmd in ("create", "exec"):
    if cmd == "exec":
        with open(opts["--process"]) as src, open(os.path.join(here, "process"), "w") as dst:
            dst.write(src.read())
    if cid == "bad":
        fail("runc create failed: no such binary")
    os.write(1, b"out-from-runtime\n")
    os.write(2, b"err-from-runtime\n")
    with open(opts["--pid-file"], "w") as f:
        f.write("1234")
elif cmd == "ps":
    print("[1,2,3]")
elif cmd == "kill":
    if cid != "x":
        fail("container not running")
elif cmd == "update":
    with open(os.path.join(here, "resources"), "w") as f:
        f.write(sys.stdin.read())
elif cmd == "events":
    print(json.dumps({"type": "stats", "id": cid, "data": {"pids": {"current": 3, "limit": 9}}}))
'''


@pytest.fixture
async def runtime(nursery, tmp_path: Path):
    fake = tmp_path / "bin" / "fakerunc"
    fake.parent.mkdir()
    fake.write_text(f"#!{sys.executable}\n" + FAKE)
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    reaper = Reaper(subreaper=False)
    await nursery.start(reaper.run)
    return Runtime(tmp_path / "root", reaper, binary=str(fake), log=tmp_path / "log.json")


def calls(rt: Runtime) -> list[list[str]]:
    text = (Path(rt.binary).parent / "calls").read_text()
    return [line.split(" ") for line in text.splitlines()]


async def test_state_parses_runc_json(runtime: Runtime):
    st = await runtime.state("x")
    assert (st.id, st.pid, st.status, st.bundle, st.annotations) == (
        "x", 4242, "running", "/b", {"k": "v"})
    assert (st.created.year, st.created.microsecond) == (2024, 123456)
    argv = calls(runtime)[-1]
    assert argv[:2] == ["--root", str(runtime.root)]
    assert argv[-2:] == ["state", "x"] and "--log-format" in argv


async def test_missing_container_is_not_found(runtime: Runtime):
    with pytest.raises(errdefs.NotFound, match="^container does not exist$"):
        await runtime.state("gone")


async def test_create_hands_stdio_over_and_reads_the_pid(runtime: Runtime, tmp_path: Path):
    r, w = os.pipe()
    try:
        pid = await runtime.create("x", tmp_path / "bundle", stdio=Stdio(None, w, w),
                                   console_socket="/tmp/cs.sock",
                                   pid_file=tmp_path / "init.pid")
        os.close(w)
        w = -1
        assert pid == 1234
        assert os.read(r, 100) == b"out-from-runtime\nerr-from-runtime\n"
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)
    argv = calls(runtime)[-1]
    assert argv[argv.index("create"):] == [
        "create", "--bundle", str(tmp_path / "bundle"), "--pid-file",
        str(tmp_path / "init.pid"), "--console-socket", "/tmp/cs.sock", "x"]
    assert argv[argv.index("--log") + 1] == str(tmp_path / "log.json")


async def test_create_error_comes_from_this_calls_log_lines(runtime: Runtime, tmp_path: Path):
    (tmp_path / "log.json").write_text('{"level":"error","msg":"an older failure"}\n')
    with pytest.raises(errdefs.Unknown, match="^runc create failed: no such binary$"):
        await runtime.create("bad", tmp_path, stdio=Stdio())


async def test_exec_writes_the_process_spec(runtime: Runtime, tmp_path: Path):
    process = {"args": ["sh", "-c", "true"], "cwd": "/", "terminal": False}
    pid = await runtime.exec("x", process, stdio=Stdio())
    assert pid == 1234
    assert json.loads((Path(runtime.binary).parent / "process").read_text()) == process
    argv = calls(runtime)[-1]
    assert "--detach" in argv and argv[-1] == "x"
    assert [p for p in os.listdir(runtime.root) if p.startswith(".")] == []  # temp files gone


async def test_kill_ps_update_stats(runtime: Runtime):
    await runtime.kill("x", 9, all=True)
    assert calls(runtime)[-1][-4:] == ["kill", "--all", "x", "9"]
    with pytest.raises(errdefs.FailedPrecondition, match="container not running"):
        await runtime.kill("y", 15)
    assert await runtime.ps("x") == [1, 2, 3]
    await runtime.update("x", {"memory": {"limit": 1}})
    assert json.loads((Path(runtime.binary).parent / "resources").read_text()) == {
        "memory": {"limit": 1}}
    assert await runtime.stats("x") == {"pids": {"current": 3, "limit": 9}}
    await runtime.delete("x", force=True)
    assert calls(runtime)[-1][-3:] == ["delete", "--force", "x"]


async def test_cancelled_command_is_killed_and_reaped(nursery, tmp_path: Path):
    slow = tmp_path / "slow"
    slow.write_text("#!/bin/sh\nexec sleep 60\n")
    slow.chmod(0o755)
    reaper = Reaper(subreaper=False)
    await nursery.start(reaper.run)
    rt = Runtime(tmp_path / "root", reaper, binary=str(slow))
    with trio.move_on_after(0.2):
        await rt.start("x")
    assert not [p for p in os.listdir("/proc") if p.isdigit()
                and Path(f"/proc/{p}/cmdline").exists()
                and b"sleep\x0060" in Path(f"/proc/{p}/cmdline").read_bytes()
                and os.getppid() != int(p) and _parent(int(p)) == os.getpid()]


def _parent(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError):
        return 0


def test_resolve_and_classify():
    assert resolve("sh") == os.path.realpath(resolve("sh")) or resolve("sh").endswith("/sh")
    with pytest.raises(errdefs.NotFound, match='exec: "no-such-rt": executable file not found'):
        resolve("no-such-rt")
    assert isinstance(classify("container with id exists: already exists", "x"),
                      errdefs.AlreadyExists)
    assert isinstance(classify("error opening file `/r/x/status`: No such file or directory",
                               "x"), errdefs.NotFound)
    assert isinstance(classify("exec: no such file or directory", "x", lookup=False),
                      errdefs.Unknown)
    assert isinstance(classify("cannot pause a stopped container", "x"),
                      errdefs.FailedPrecondition)


def test_stats_from_runc_events():
    event = {"type": "stats", "data": {
        "cpu": {"usage": {"total": 10, "user": 6, "kernel": 4},
                "throttling": {"periods": 1, "throttledPeriods": 2, "throttledTime": 3}},
        "memory": {"usage": {"usage": 5, "limit": 6, "max": 7, "failcnt": 8},
                   "swap": {"usage": 9, "limit": 10}, "raw": {"cache": 1, "oom_kill": 2}},
        "pids": {"current": 4, "limit": 0}}}
    assert from_events(event) == {
        "cpu": {"usage_total": 10, "usage_user": 6, "usage_kernel": 4, "nr_periods": 1,
                "throttled_periods": 2, "throttled_time": 3},
        "memory": {"usage": 5, "limit": 6, "max_usage": 7, "failcnt": 8, "swap_usage": 9,
                   "swap_limit": 10, "stat": {"cache": 1, "oom_kill": 2}, "oom_kill": 2},
        "pids": {"current": 4, "limit": 0},
    }
    assert from_events({"type": "stats", "data": {}}) == {}
