"""The zygote's pure parts: KSM opt-in, its idle timeout, its daemon check."""

from __future__ import annotations

import json
import os
import socket

from berth.core.shim import zygote
from tests import forked


def _mergeable_writable_mappings(env_value: str | None) -> tuple[int, int]:
    """In a forked child: (writable private mappings, those flagged mergeable "mg")."""

    def count() -> str:
        if env_value is None:
            os.environ.pop("BERTH_SHIM_KSM", None)
        else:
            os.environ["BERTH_SHIM_KSM"] = env_value
        zygote._offer_to_ksm()
        writable = mergeable = 0
        perms = ""
        with open("/proc/self/smaps") as f:
            for line in f:
                fields = line.split()
                if "-" in fields[0] and not fields[0].endswith(":"):
                    perms = fields[1]
                elif fields[0] == "VmFlags:" and perms == "rw-p":
                    writable += 1
                    mergeable += "mg" in fields[1:]
        return f"{writable} {mergeable}"

    writable, mergeable = map(int, forked.in_child(count).split())
    return writable, mergeable


def test_ksm_is_opt_in():
    writable, mergeable = _mergeable_writable_mappings(None)
    assert writable > 0 and mergeable == 0
    assert _mergeable_writable_mappings("0")[1] == 0


def test_ksm_marks_the_writable_private_mappings():
    writable, mergeable = _mergeable_writable_mappings("1")
    # A few writable mappings may be refused (e.g. ones mapped after the scan).
    assert mergeable >= writable - 2 and mergeable > 0


def test_idle_timeout_from_the_environment(monkeypatch):
    monkeypatch.setenv("BERTH_SHIM_ZYGOTE_IDLE", "2.5")
    assert zygote._idle_timeout() == 2.5
    for bad in ("", "soon", "0", "-3"):
        monkeypatch.setenv("BERTH_SHIM_ZYGOTE_IDLE", bad)
        assert zygote._idle_timeout() == 600.0
    monkeypatch.delenv("BERTH_SHIM_ZYGOTE_IDLE")
    assert zygote._idle_timeout() == 600.0


def test_daemon_socket_of_a_request_and_whether_it_answers(tmp_path):
    request = zygote.make_request(
        ["-namespace", "ns", "-address", f"unix://{tmp_path}/d.sock", "-id", "c1"], "/", {})
    assert zygote._daemon_socket(request) == f"{tmp_path}/d.sock"
    assert zygote._daemon_socket(b"garbage") == ""
    assert zygote._daemon_socket(json.dumps({"argv": ["-bogus-flag"]}).encode()) == ""
    assert not zygote.daemon_alive(f"{tmp_path}/d.sock")
    assert not zygote.daemon_alive("")
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(f"{tmp_path}/d.sock")
        s.listen(1)
        assert zygote.daemon_alive(f"{tmp_path}/d.sock")
