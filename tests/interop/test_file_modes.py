"""Nothing berth keeps under its root or state folder is readable by another local user.

Issue 8.4: the root was 0711, the metadata folder 0755 and ``meta.db`` 0644, so
``setpriv --reuid=65534 ... cat meta.db`` showed a container's environment; content blobs
were world-readable too. Here a container with a secret in its environment runs (berth's
own runtime and runc's shim), an image is imported, and then every path under root and
state, as root lists them, is tried as uid 65534 with no groups: every open, listdir and
connect must fail.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import tempfile
from pathlib import Path

import pytest

from tests import daemons
from tests.interop.test_ctr_berth_runtime import NAME, RUNTIME, Berth, berth  # noqa: F401

pytestmark = [pytest.mark.interop, pytest.mark.root]

SECRET = "SECRET_TOKEN=berth-file-modes-secret"

# Runs as uid 65534 under the system interpreter (the test's virtualenv may not be readable
# by that user): reads paths on stdin, prints each one it could open, list or connect to.
PROBE = r"""
import json, os, socket, stat, sys
for line in sys.stdin:
    path = line.rstrip("\n")
    try:
        st = os.lstat(path)
    except OSError:
        continue
    try:
        if stat.S_ISDIR(st.st_mode):
            os.listdir(path)
        elif stat.S_ISSOCK(st.st_mode):
            with socket.socket(socket.AF_UNIX) as s:
                s.connect(path)
        elif stat.S_ISFIFO(st.st_mode):
            os.close(os.open(path, os.O_RDONLY | os.O_NONBLOCK))
        elif stat.S_ISLNK(st.st_mode):
            continue
        else:
            with open(path, "rb") as f:
                f.read(1)
    except OSError:
        continue
    print(json.dumps([path, oct(st.st_mode)]))
"""


def every_path(*tops: Path) -> list[str]:
    """Every path below ``tops`` (and the tops), without following links or mounts' roots
    out of the tree; a container's mounted rootfs is walked too, it sits under state."""
    found: list[str] = []
    for top in tops:
        found.append(str(top))
        for dirpath, dirnames, filenames in os.walk(top):
            found += [os.path.join(dirpath, n) for n in dirnames + filenames]
    return found


def readable_by_nobody(paths: list[str]) -> list[tuple[str, str]]:
    p = subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
         "/usr/bin/python3", "-c", PROBE],
        input="\n".join(paths) + "\n", capture_output=True, text=True, timeout=120,
    )
    assert p.returncode == 0, p.stderr
    return [tuple(json.loads(line)) for line in p.stdout.splitlines()]


def test_uid_65534_reads_nothing_under_root_or_state(berth: Berth) -> None:  # noqa: F811
    d = berth.daemon
    # Both runtimes, each with a secret in its environment, running while we look.
    ours, runc = berth.id("modes-berth"), berth.id("modes-runc")
    berth.ok("run", "--runtime", RUNTIME, "-d", "--env", SECRET, NAME, ours, "sleep", "600")
    berth.ok("run", "--runtime", "io.containerd.runc.v2", "-d", "--env", SECRET, NAME, runc,
             "sleep", "600")
    berth.ok("tasks", "exec", "--exec-id", "ex1", ours, "true")
    # The secret is on disk (metadata, bundles): this test looks at the right files.
    assert any(SECRET.encode() in Path(p).read_bytes()
               for p in every_path(d.root) if Path(p).is_file() and "meta.db" in p)

    paths = every_path(d.root, d.state)
    assert len(paths) > 100, paths  # blobs, snapshots, bundles, shim state
    got = readable_by_nobody(paths)
    assert got == [], "\n".join(f"{m} {p}" for p, m in got)
    # Defence in depth: every file that holds the secret is private on its own or behind a
    # private folder below the top one, so a looser root would still not expose it.
    holders = [Path(p) for p in paths
               if Path(p).is_file() and not Path(p).is_symlink() and os.access(p, os.R_OK)
               and SECRET.encode() in Path(p).read_bytes()]
    assert holders
    for p in holders:
        top = d.root if p.is_relative_to(d.root) else d.state
        chain = [p, *[a for a in p.parents if a.is_relative_to(top) and a != top]]
        assert any(stat.S_IMODE(a.stat().st_mode) & 0o007 == 0 for a in chain), \
            [(str(a), oct(a.stat().st_mode)) for a in chain]
    # As containerd: the root is private; the state folder only lets others through to
    # what they are given (a socket with its configured group, a user namespace's rootfs).
    assert stat.S_IMODE(d.root.stat().st_mode) == 0o700
    assert stat.S_IMODE(d.state.stat().st_mode) == 0o711


def test_existing_world_readable_root_is_tightened_at_start(berth: Berth) -> None:  # noqa: F811
    d = berth.daemon
    d.stop()
    os.chmod(d.root, 0o755)
    db = next(Path(p) for p in every_path(d.root) if p.endswith("meta.db"))
    os.chmod(db.parent, 0o755)
    os.chmod(db, 0o644)
    d.start()
    assert stat.S_IMODE(d.root.stat().st_mode) == 0o700
    assert stat.S_IMODE(db.stat().st_mode) & 0o077 == 0
    assert readable_by_nobody(every_path(d.root, d.state)) == []


def test_sockets_keep_their_configured_owner(tmp_path_factory: pytest.TempPathFactory) -> None:
    # The state folder is 0711, not 0700, so that a socket given to a user or group in the
    # config stays reachable by them (containerd's [grpc] and [ttrpc] uid/gid).
    base = Path(tempfile.mkdtemp(prefix="berth-fm-", dir="/tmp"))
    base.chmod(0o755)
    cfg = base / "config.toml"
    cfg.write_text("[grpc]\nuid = 65534\ngid = 65534\n[ttrpc]\nuid = 65534\ngid = 65534\n")
    d = daemons.berthd(base / "d", "--config", str(cfg))
    try:
        d.start()
        for sock in (d.address, d.ttrpc_address):
            st = sock.stat()
            assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (65534, 65534, 0o660)
        as_nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
        r = subprocess.run([*as_nobody, daemons.CTR, "--address", str(d.address), "version"],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0 and "Server:" in r.stdout, r
        assert readable_by_nobody(every_path(d.root)) == []
    finally:
        d.stop()
        shutil.rmtree(base, ignore_errors=True)


def test_user_namespace_container_reaches_its_rootfs(berth: Berth) -> None:  # noqa: F811
    # Why the state folder is 0711 and not 0700 (containerd's reason too): runc's init,
    # already root of the container's user namespace, mounts the rootfs from the bundle
    # under state; with state 0700 it gets "permission denied" (seen with 0700 here).
    cid = berth.id("modes-userns")
    r = berth.ctr("run", "--rm", "--runtime", "io.containerd.runc.v2",
                  "--uidmap", "0:100000:65536", "--gidmap", "0:100000:65536",
                  NAME, cid, "cat", "/proc/self/uid_map")
    assert r.rc == 0, r
    assert r.out.split() == ["0", "100000", "65536"]
