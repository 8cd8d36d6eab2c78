"""A shim that dies before it opens its log still leaves a line with its id (issue 10.6)."""

from __future__ import annotations

import os
import socket
from pathlib import Path

from berth.core.shim import logging as shim_logging, zygote


def test_a_shim_that_fails_early_in_the_zygote_logs_its_id(tmp_path: Path) -> None:
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    a, b = socket.socketpair()
    a.close()
    # An unknown flag: the forked shim fails while parsing its command line, before it
    # has a logger, with stderr on /dev/null in production.
    req = {"argv": ["-namespace", "ns1", "-id", "c-early", "-no-such-flag"],
           "cwd": str(bundle), "env": {}}
    pid = zygote._spawn_shim(req, b.detach(), [])
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 1
    text = (bundle / "log").read_text()
    assert "level=error" in text and "msg=\"shim failed\"" in text
    assert "namespace=ns1" in text and "id=c-early" in text
    assert "no-such-flag" in text


def test_report_failure_writes_one_logfmt_line(tmp_path: Path) -> None:
    try:
        raise RuntimeError('boom "quoted"\nsecond line')
    except RuntimeError as exc:
        shim_logging.report_failure(str(tmp_path), "shim zygote failed", exc,
                                    namespace="default", id="c1")
    lines = (tmp_path / "log").read_text().splitlines()
    assert len(lines) == 1
    assert "id=c1" in lines[0] and "namespace=default" in lines[0]
    assert 'error="RuntimeError: boom \\"quoted\\"\\nsecond line"' in lines[0]


def test_ids_from_argv_reads_both_spellings() -> None:
    assert shim_logging.ids_from_argv(["-namespace", "n", "-id=x", "-bad"]) == ("n", "x")
    assert shim_logging.ids_from_argv(["--id"]) == ("", "")
