"""The shim's log sink: logfmt lines, never blocking the event loop."""

from __future__ import annotations

import os

import structlog

from berth.core.shim import logging as shim_logging


def test_fifo_without_reader_is_opened_read_write(tmp_path):
    os.mkfifo(tmp_path / "log")
    fd = shim_logging.open_log(str(tmp_path))
    try:
        os.write(fd, b"kept until a reader comes\n")
        reader = os.open(tmp_path / "log", os.O_RDONLY | os.O_NONBLOCK)
        try:
            assert os.read(reader, 100) == b"kept until a reader comes\n"
        finally:
            os.close(reader)
    finally:
        os.close(fd)


def test_plain_file_when_there_is_no_fifo(tmp_path):
    fd = shim_logging.open_log(str(tmp_path))
    try:
        os.write(fd, b"x\n")
    finally:
        os.close(fd)
    assert (tmp_path / "log").read_text() == "x\n"


def test_full_pipe_drops_lines_instead_of_blocking():
    r, w = os.pipe()
    os.set_blocking(w, False)
    sink = shim_logging.NonBlockingWriter(w)
    try:
        line = "y" * 4096 + "\n"
        for _ in range(64):  # more than a pipe holds
            sink.write(line)
        assert sink.dropped > 0
    finally:
        os.close(r)
        os.close(w)


def test_logfmt_lines_with_logrus_keys(tmp_path):
    path = tmp_path / "log"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    saved = structlog.get_config()
    try:
        shim_logging.setup(fd, debug=False, runtime="io.containerd.berth.v1")
        logger = structlog.get_logger("t").bind(namespace="ns", id="c1")
        logger.info("created", pid=42)
        logger.debug("hidden")
    finally:
        os.close(fd)
        structlog.configure(**saved)
        structlog.contextvars.clear_contextvars()
    [line] = path.read_text().splitlines()
    assert line.startswith("time=")
    assert " level=info msg=created " in line
    assert line.endswith("namespace=ns id=c1 pid=42 runtime=io.containerd.berth.v1")
