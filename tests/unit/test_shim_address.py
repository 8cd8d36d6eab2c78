"""Socket address derivation, grouping and the address file."""

from __future__ import annotations

import hashlib
import json
import os

import pytest

from berth.core.shim import address as addr


def test_socket_lives_beside_the_daemon_socket():
    got = addr.socket_address("/run/containerd/containerd.sock", "default", "c1")
    expected = hashlib.sha256(
        b"containerd-shim-berth-v1\0/run/containerd/containerd.sock\0default\0c1").hexdigest()
    assert got == f"unix:///run/containerd/s/{expected}"
    assert addr.socket_dir("unix:///run/berth/berth.sock") == "/run/berth/s"
    assert addr.socket_dir("") == addr.FALLBACK_SOCKET_DIR


def test_address_depends_on_daemon_namespace_and_group():
    base = addr.socket_address("/d/c.sock", "ns", "g")
    assert base == addr.socket_address("/d/c.sock", "ns", "g")
    assert len({base, addr.socket_address("/d/c.sock", "ns2", "g"),
                addr.socket_address("/d/c.sock", "ns", "g2"),
                addr.socket_address("/e/c.sock", "ns", "g")}) == 4


def test_too_long_paths_fall_back_to_run_berth():
    deep = "/tmp/" + "x" * 80 + "/containerd.sock"
    got = addr.socket_address(deep, "ns", "c")
    assert got.startswith("unix:///run/berth/s/")
    assert len(addr.socket_path(got)) <= addr.SOCKET_PATH_LIMIT


def test_grouping_annotations():
    assert addr.group_of({}, "c1") == "c1"
    assert addr.group_of(None, "c1") == "c1"
    assert addr.group_of({"io.kubernetes.cri.sandbox-id": "sb"}, "c1") == "sb"
    assert addr.group_of({"io.containerd.berth.v1.group": "g",
                          "io.kubernetes.cri.sandbox-id": "sb"}, "c1") == "g"
    assert addr.group_of({"io.kubernetes.cri.sandbox-id": ""}, "c1") == "c1"


def test_read_annotations_and_address_file(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"annotations": {"a": "b"}}))
    assert addr.read_annotations(str(tmp_path)) == {"a": "b"}
    (tmp_path / "config.json").write_text(json.dumps({"ociVersion": "1.0.2"}))
    assert addr.read_annotations(str(tmp_path)) == {}
    addr.write_atomic(str(tmp_path / "address"), "unix:///x")
    assert addr.read_address(str(tmp_path)) == "unix:///x"
    assert sorted(os.listdir(tmp_path)) == ["address", "config.json"]


def test_listen_replaces_stale_sockets_and_yields_to_live_ones(tmp_path):
    address = "unix://" + str(tmp_path / "s" / "shim")
    first = addr.listen(address)
    assert first is not None
    assert os.stat(addr.socket_path(address)).st_mode & 0o777 == 0o600
    try:
        assert addr.can_connect(address)
        assert addr.listen(address) is None  # alive: the caller joins it
    finally:
        first.close()
    assert not addr.can_connect(address)  # the file is left, nobody answers
    second = addr.listen(address)
    assert second is not None
    second.close()
    addr.remove_socket(address)
    assert not os.path.exists(addr.socket_path(address))


def test_listen_refuses_a_non_socket(tmp_path):
    path = tmp_path / "file"
    path.write_text("x")
    with pytest.raises(OSError, match="exists and is not a socket"):
        addr.listen("unix://" + str(path))
    assert path.read_text() == "x"


def test_zygote_socket_sits_with_the_shim_sockets():
    from berth.core.shim import zygote

    path = zygote.zygote_path("/run/containerd/containerd.sock")
    assert path.startswith("/run/containerd/s/zygote-")
    assert path == zygote.zygote_path("/run/containerd/containerd.sock")
    deep = "/tmp/" + "y" * 90 + "/c.sock"
    assert zygote.zygote_path(deep).startswith("/run/berth/s/zygote-")


@pytest.fixture
def short_tmp():
    """A folder short enough for socket paths (sockaddr_un holds 107 bytes)."""
    import shutil
    import tempfile
    from pathlib import Path

    path = Path(tempfile.mkdtemp(prefix="bsa-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _bundle(root, annotations):
    bundle = root / "bundle"
    bundle.mkdir()
    (bundle / "config.json").write_text(json.dumps({"annotations": annotations}))
    return bundle


def test_claim_binds_the_group_socket_and_release_leaves_nothing(short_tmp):
    """The start action's first step (also berthd's when it asks the zygote itself)."""
    import socket

    from berth.core.shim import start
    from berth.core.shim.flags import Flags

    bundle = _bundle(short_tmp, {})
    daemon = str(short_tmp / "d" / "berth.sock")
    address, listener = start.claim(Flags(namespace="ns", id="c1", address=daemon),
                                    str(bundle))
    assert address == addr.socket_address(daemon, "ns", "c1")
    assert isinstance(listener, socket.socket)
    assert (bundle / addr.ADDRESS_FILE).read_text() == address
    assert addr.can_connect(address)
    start.release(address, listener)
    assert os.listdir(short_tmp / "d" / "s") == []


def test_claim_joins_a_live_group_shim(short_tmp):
    """A group whose shim serves already is joined: no socket to bind."""
    import socket

    from berth.core.shim import start
    from berth.core.shim.flags import Flags

    bundle = _bundle(short_tmp, {addr.GROUP_ANNOTATIONS[1]: "pod1"})
    daemon = str(short_tmp / "d" / "berth.sock")
    address = addr.socket_address(daemon, "ns", "pod1")
    live = addr.listen(address)
    assert isinstance(live, socket.socket)
    try:
        flags = Flags(namespace="ns", id="c2", address=daemon)
        assert start.claim(flags, str(bundle)) == (address, None)
        assert (bundle / addr.ADDRESS_FILE).read_text() == address
    finally:
        live.close()


async def test_berthd_asks_no_zygote_where_none_listens(short_tmp):
    import socket

    from berth.core.runtime.binary import _ask_zygote

    listener = socket.socket(socket.AF_UNIX)
    try:
        assert await _ask_zygote(str(short_tmp / "zygote-x"), b"{}", listener) is None
    finally:
        listener.close()


def test_zygote_replies():
    from berth.core.shim import zygote

    assert zygote.read_reply(b'{"pid": 42}') == 42
    assert zygote.read_reply(b"not json") is None
    assert zygote.read_reply(b"[1]") is None
    assert zygote.read_reply(b'{"pid": -1}') is None
    with pytest.raises(RuntimeError, match="zygote: expected one listening socket"):
        zygote.read_reply(b'{"error": "expected one listening socket"}')
