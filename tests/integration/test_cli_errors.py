"""Every `berth` command with bad arguments, against a real berthd and beside the real ctr.

Each case asserts what a new user sees: a non-zero exit, one short line on stderr with no
traceback, naming the argument that was wrong; where ctr has the same command, ctr run
against the same berthd with the same input gives the same message (or one of the two
contains the other, where ctr adds its own context such as "failed to list images: ").
Also: a daemon that is not there, one killed mid-command, and ^C.
"""

from __future__ import annotations

import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from berth.core.cli import app
from tests import daemons
from tests.daemons import Daemon, Result

# Bounds a wait that should end by itself; nothing is measured by it.
HANG_GUARD = 60.0
NS_PATTERN = "^[A-Za-z0-9]+(?:[._-](?:[A-Za-z0-9]+))*$"


@dataclass(frozen=True)
class Case:
    args: tuple[str, ...]
    names: str  # the wrong argument, as the message must name it
    # How ctr's message for the same command relates to berth's: "same", "ctr-adds"
    # (ctr's ends with berth's), "berth-adds" (berth's contains ctr's), or "" (no ctr
    # command, or ctr words it its own way).
    ctr: str = ""
    setup: tuple[str, ...] = ()  # a berth command that must succeed first


def case(*args: str, names: str, ctr: str = "", setup: tuple[str, ...] = ()) -> Case:
    return Case(tuple(args), names, ctr, setup)


MISSING_TAR = "/nonexistent/berth-missing.tar"
BAD_REF = "bad ref!!"
BAD_DIGEST = "sha256:zz"

# At least one case per command (test_every_command_has_a_case checks it).
CASES = [
    case("-n", "bad/ns", "namespaces", "label", "x", "a=b", names="bad/ns"),
    case("namespaces", "create", "bad/name", names="bad/name", ctr="same"),
    case("namespaces", "list", "extra", names="extra"),
    case("namespaces", "remove", "busy", names="busy", ctr="same",
         setup=("-n", "busy", "containers", "create", "--rootfs", "/", "hold", "true")),
    case("plugins", "list", "type==", names="type==", ctr="same"),
    case("events", "topic==", names="topic==", ctr="berth-adds"),
    case("leases", "create", "--expires", "soon", names="soon"),
    case("leases", "list", "id==", names="id==", ctr="ctr-adds"),
    case("leases", "delete", "no-such-lease", names="no-such-lease", ctr="berth-adds"),
    case("-n", "bad/ns", "images", "list", names="bad/ns", ctr="ctr-adds"),
    case("images", "pull", BAD_REF, names=BAD_REF),
    case("images", "push", BAD_REF, names=BAD_REF),
    case("images", "remove", "no-such-image", names="no-such-image"),
    case("images", "tag", "no-such-image", "other", names="no-such-image", ctr="same"),
    case("images", "import", MISSING_TAR, names=MISSING_TAR, ctr="same"),
    case("images", "import", "/etc/hostname", names="/etc/hostname"),
    case("images", "export", "/nonexistent/out.tar", "no-such-image",
         names="/nonexistent/out.tar", ctr="same"),
    case("images", "import-rootfs", "/nonexistent/rootfs", "x", names="/nonexistent/rootfs"),
    case("images", "mount", "no-such-image", "/tmp", names="no-such-image", ctr="same"),
    case("images", "unmount", names="target"),
    case("snapshots", "list", "kind==", names="kind=="),
    case("snapshots", "info", "no-such-key", names="no-such-key"),
    case("snapshots", "remove", "no-such-key", names="no-such-key"),
    case("snapshots", "prepare", "k1", "no-such-parent", names="no-such-parent", ctr="same"),
    case("snapshots", "view", "k2", "no-such-parent", names="no-such-parent", ctr="same"),
    case("snapshots", "commit", "n1", "no-such-key", names="no-such-key", ctr="same",
         setup=("snapshots", "prepare", "k-active")),
    case("snapshots", "mounts", "/tmp", "no-such-key", names="no-such-key", ctr="same"),
    case("snapshots", "usage", "no-such-key", names="no-such-key", ctr="same"),
    case("snapshots", "--snapshotter", "no-such-snapshotter", "tree",
         names="no-such-snapshotter"),
    case("content", "list", "size==", names="size==", ctr="same"),
    case("content", "get", BAD_DIGEST, names=BAD_DIGEST, ctr="berth-adds"),
    case("content", "delete", BAD_DIGEST, names=BAD_DIGEST),
    case("content", "label", BAD_DIGEST, "a=b", names=BAD_DIGEST),
    case("content", "active", "x==", names="x==", ctr="same"),
    case("run", "--rm", BAD_REF, "c1", names=BAD_REF, ctr="same"),
    case("run", "--rm", "--env-file", "/nonexistent/env", "--rootfs", "/", "c1", "true",
         names="/nonexistent/env"),
    case("containers", "create", "no-such-image", "c1", names="no-such-image", ctr="same"),
    case("containers", "delete", "no-such-ctr", names="no-such-ctr"),
    case("containers", "info", "no-such-ctr", names="no-such-ctr", ctr="same"),
    case("containers", "label", "no-such-ctr", "a=b", names="no-such-ctr"),
    case("containers", "list", "id==", names="id==", ctr="same"),
    case("tasks", "attach", "no-such-ctr", names="no-such-ctr", ctr="same"),
    case("tasks", "delete", "no-such-ctr", names="no-such-ctr", ctr="berth-adds"),
    case("tasks", "exec", "--exec-id", "e1", "no-such-ctr", "sh", names="no-such-ctr",
         ctr="same"),
    case("tasks", "exec", "--exec-id", "", "no-such-ctr", "sh", names="exec id"),
    case("tasks", "list", "extra", names="extra"),
    case("tasks", "kill", "no-such-ctr", names="no-such-ctr", ctr="same"),
    case("tasks", "metrics", "no-such-ctr", names="no-such-ctr", ctr="same"),
    case("tasks", "pause", "no-such-ctr", names="no-such-ctr", ctr="same"),
    case("tasks", "ps", "no-such-ctr", names="no-such-ctr", ctr="same"),
    case("tasks", "resume", "no-such-ctr", names="no-such-ctr", ctr="same"),
    case("tasks", "start", "no-such-ctr", names="no-such-ctr", ctr="same"),
    case("version", "extra", names="extra"),
]


# Flags of the cases above that take a value.
VALUE_FLAGS = frozenset({"-n", "--snapshotter", "--exec-id", "--env-file", "--expires"})


def _prog(c: Case) -> str:
    """The command a case runs ("berth images pull"): the longest known word prefix."""
    words, args = [], iter(c.args)
    for a in args:
        if a in VALUE_FLAGS:
            next(args)
        elif not a.startswith("-"):
            words.append(a)
    for n in (2, 1):
        prog = " ".join(["berth", *words[:n]])
        if prog in app.EXAMPLES:
            return prog
    raise AssertionError(f"no command for {c.args}")


def _last_line(r: Result, prog: str) -> str:
    lines = [line for line in r.err.splitlines() if line.startswith(f"{prog}: ")]
    assert lines, r
    return lines[-1].removeprefix(f"{prog}: ")


def assert_one_clear_line(r: Result, names: str) -> str:
    assert r.rc != 0, r
    assert "Traceback" not in r.err, r.err
    lines = r.err.strip().splitlines()
    assert 1 <= len(lines) <= 3, r.err
    # "berth: <message>", or for a usage mistake "berth <command>: <message>" and where
    # its help is.
    assert lines[0].startswith("berth"), r.err
    assert names in lines[0], (names, r.err)
    return lines[0]


@pytest.fixture(scope="module")
def daemon() -> Iterator[Daemon]:
    base = Path(tempfile.mkdtemp(prefix="berth-err-", dir="/tmp"))
    d = daemons.berthd(base).start()
    yield d
    d.stop()
    shutil.rmtree(base, ignore_errors=True)


def test_every_command_has_a_case() -> None:
    app.parser()
    groups = {" ".join(p.split()[:2]) for p in app.EXAMPLES if len(p.split()) == 3}
    commands = set(app.EXAMPLES) - groups
    covered = {_prog(c) for c in CASES}
    assert commands - covered == set()


@pytest.mark.parametrize("c", CASES, ids=[" ".join(c.args) for c in CASES])
def test_bad_arguments(daemon: Daemon, c: Case) -> None:
    if c.setup:
        first = daemons.berth(daemon.address, *c.setup)
        assert first.rc == 0 or "already exists" in first.err, first
    r = daemons.berth(daemon.address, *c.args)
    assert_one_clear_line(r, c.names)
    if not c.ctr:
        return
    # The same input through the real ctr, against the same daemon.
    theirs = daemons.ctr(daemon.address, *c.args)
    assert theirs.rc != 0, theirs
    mine, ctr_says = _last_line(r, "berth"), _last_line(theirs, "ctr")
    if c.ctr == "same":
        assert mine == ctr_says
    elif c.ctr == "ctr-adds":
        assert ctr_says.endswith(mine), (mine, ctr_says)
    else:
        # ctr's message with the daemon's status prefix removed.
        ctr_says = ctr_says.removeprefix("rpc error: code = Unknown desc = ")
        assert ctr_says.removesuffix(": invalid argument") in mine, (mine, ctr_says)


def test_namespace_message_is_the_issues(daemon: Daemon) -> None:
    r = daemons.berth(daemon.address, "images", "ls", namespace="bad/ns")
    assert (r.rc, r.err) == (1, f'berth: namespace validation: identifier "bad/ns" must match '
                                f"{NS_PATTERN}: invalid argument\n")
    r = daemons.berth(daemon.address, "images", "pull", BAD_REF)
    assert (r.rc, r.err) == (1, f"berth: {BAD_REF}: invalid reference format\n")
    r = daemons.berth(daemon.address, "images", "import", MISSING_TAR)
    assert (r.rc, r.err) == (1, f"berth: open {MISSING_TAR}: no such file or directory\n")


def test_registry_that_is_not_there_is_named(daemon: Daemon) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    r = daemons.berth(daemon.address, "images", "pull", "--plain-http",
                      f"127.0.0.1:{port}/library/busybox:latest")
    assert_one_clear_line(r, f"127.0.0.1:{port}")
    assert r.err == f"berth: failed to connect to 127.0.0.1:{port}: connection refused\n"


def test_daemon_not_there(tmp_path: Path) -> None:
    missing = tmp_path / "berth.sock"
    for args in (("images", "ls"), ("tasks", "ls"), ("namespaces", "create", "x"),
                 ("content", "get", BAD_DIGEST)):
        r = daemons.berth(missing, *args)
        assert (r.rc, r.err) == (1, f'berth: failed to dial "{missing}": connect: no such '
                                    "file or directory (daemon not reachable)\n"), args
    # A socket file nobody listens on: ctr says the same words up to its Go transport text.
    dead = tmp_path / "dead.sock"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(dead))
    s.close()
    r = daemons.berth(dead, "images", "ls")
    assert_one_clear_line(r, str(dead))
    theirs = daemons.ctr(dead, "images", "ls")
    assert theirs.rc == 1
    prefix = f'failed to dial "{dead}": '
    assert _last_line(r, "berth").startswith(prefix)
    assert _last_line(theirs, "ctr").startswith(prefix)
    assert "connect: connection refused" in r.err and "connect: connection refused" in theirs.err


def test_version_without_daemon(tmp_path: Path) -> None:
    missing = tmp_path / "berth.sock"
    r = daemons.berth(missing, "version")
    assert r.rc == 1
    assert r.out == "Client:\n  Version:  0.1.0\n\n"
    assert r.err == (f'berth: failed to dial "{missing}": connect: no such file or directory '
                     "(daemon not reachable)\n")


def _follow_events(address: Path) -> subprocess.Popen[str]:
    p = subprocess.Popen([sys.executable, "-m", "berth.core.cli", "--address", str(address),
                          "events"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert p.stdout is not None
    # The subscription is live once an event published after it comes through; publish
    # until one does (the first may precede the subscription).
    deadline = time.monotonic() + HANG_GUARD
    while time.monotonic() < deadline:
        daemons.berth(address, "namespaces", "create", f"probe-{uuid.uuid4().hex[:12]}")
        ready, _, _ = select.select([p.stdout], [], [], 1.0)
        if ready and p.stdout.readline():
            return p
    p.kill()
    p.communicate()
    raise AssertionError("events never arrived")


def test_daemon_killed_mid_command() -> None:
    base = Path(tempfile.mkdtemp(prefix="berth-errk-", dir="/tmp"))
    d = daemons.berthd(base).start()
    try:
        p = _follow_events(d.address)
        d.kill()
        _, err = p.communicate(timeout=HANG_GUARD)
        assert p.returncode == 1
        assert "Traceback" not in err
        assert err.startswith(f"berth: connection to berthd at {d.address} lost: "), err
        assert len(err.splitlines()) == 1, err
    finally:
        d.stop()
        shutil.rmtree(base, ignore_errors=True)


def test_interrupt_exits_130_without_traceback(daemon: Daemon) -> None:
    p = _follow_events(daemon.address)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=HANG_GUARD)
    assert (p.returncode, err) == (130, "")
