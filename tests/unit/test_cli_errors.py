"""The CLI's one error path (berth.core.cli.errors) and every command's help example."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from grpclib import GRPCError
from grpclib.const import Status

from berth.core import errdefs
from berth.core.cli import app, errors
from berth.core.client.client import translate
from berth.core.images import reference


def describe(exc: BaseException, address: str = "/nonexistent/berth.sock",
             connected: bool = False) -> errors.Failure:
    return errors.describe(exc, address=address, connected=connected)


@pytest.mark.parametrize(("status", "message", "want"), [
    # containerd's errdefs.FromGRPC: the class is said once, unknown codes read "unknown".
    (Status.NOT_FOUND, 'image "x": not found', 'image "x": not found'),
    (Status.NOT_FOUND, 'image "x"', 'image "x": not found'),
    (Status.INVALID_ARGUMENT, "invalid argument", "invalid argument"),
    (Status.ALREADY_EXISTS, 'namespace "web": already exists',
     'namespace "web": already exists'),
    (Status.INTERNAL, "boom", "boom: unknown"),
    (Status.UNKNOWN, "", "unknown"),
    (Status.FAILED_PRECONDITION, "task must be stopped",
     "task must be stopped: failed precondition"),
])
def test_grpc_status_reads_as_containerds_client(status: Status, message: str,
                                                 want: str) -> None:
    e = GRPCError(status, message)
    assert describe(e) == errors.Failure(want, 1)
    assert str(translate(e)) == want
    assert translate(e).code == errdefs.Code(status.value) or status is Status.INTERNAL


def test_client_side_errors_are_their_message() -> None:
    with pytest.raises(errdefs.InvalidArgument) as info:
        reference.parse_normalized("bad ref!!")
    assert describe(info.value) == errors.Failure("bad ref!!: invalid reference format", 1)


def test_file_errors_name_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nonexistent.tar"
    with pytest.raises(OSError) as info:
        open(missing, "rb")  # noqa: SIM115 - the error is the point
    assert describe(info.value).message == f"open {missing}: no such file or directory"
    with pytest.raises(OSError) as info:
        open(tmp_path, "rb")  # noqa: SIM115
    assert describe(info.value).message == f"open {tmp_path}: is a directory"


def test_keyboard_interrupt_is_130_and_silent() -> None:
    assert describe(KeyboardInterrupt()) == errors.Failure("", 130)


def test_exception_group_reports_its_first_failure() -> None:
    group = BaseExceptionGroup("tasks", [errdefs.NotFound('image "x"'), ValueError("y")])
    assert describe(group) == errors.Failure('image "x": not found', 1)


def test_daemon_not_there_names_the_socket(tmp_path: Path) -> None:
    missing = str(tmp_path / "berth.sock")
    failure = describe(FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT)), missing)
    assert failure.message.startswith(f'failed to dial "{missing}": connect: no such file')
    # A socket nobody listens on any more: refused.
    dead = tmp_path / "dead.sock"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(dead))
    s.close()
    failure = describe(ConnectionRefusedError(errno.ECONNREFUSED, "refused"), f"unix://{dead}")
    assert failure.message.startswith(f'failed to dial "{dead}": connect: connection refused')
    # Once a call went through, the same error means the daemon went away.
    failure = describe(ConnectionRefusedError(errno.ECONNREFUSED, "refused"), str(dead),
                       connected=True)
    assert failure.message == (f"connection to berthd at {dead} lost: "
                               "connect: connection refused")


def test_socket_error_with_a_live_daemon_socket_is_not_blamed_on_it(tmp_path: Path) -> None:
    path = tmp_path / "live.sock"
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(path))
    listener.listen(1)
    try:
        failure = describe(ConnectionResetError(errno.ECONNRESET, "reset"), str(path))
    finally:
        listener.close()
    assert failure.message == "connection reset by peer"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_registry_that_refuses_names_its_host() -> None:
    port = _free_port()

    async def get() -> None:
        async with httpx.AsyncClient() as client:
            await client.get(f"http://127.0.0.1:{port}/v2/")

    with pytest.raises(httpx.ConnectError) as info:
        asyncio.run(get())
    assert describe(info.value).message == \
        f"failed to connect to 127.0.0.1:{port}: connection refused"


def test_registry_host_that_does_not_resolve_is_named() -> None:
    # The resolver's answer is built here rather than asked of the network.
    e = httpx.ConnectError("lookup failed",
                           request=httpx.Request("GET", "https://docker.io/v2/"))
    e.__cause__ = socket.gaierror(socket.EAI_NONAME, "Name or service not known")
    assert describe(e).message == "failed to resolve docker.io: Name or service not known"


def test_untrusted_registry_certificate_is_named() -> None:
    # A TLS server on 127.0.0.1 with a certificate nobody trusts (made here by openssl).
    import ssl
    import subprocess
    import tempfile
    import threading

    with tempfile.TemporaryDirectory() as d:
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days",
                        "1", "-subj", "/CN=127.0.0.1", "-keyout", f"{d}/k.pem", "-out",
                        f"{d}/c.pem"], check=True, capture_output=True, timeout=60)
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(f"{d}/c.pem", f"{d}/k.pem")
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    port = listener.getsockname()[1]

    def serve() -> None:
        conn, _ = listener.accept()
        with contextlib.suppress(OSError), ctx.wrap_socket(conn, server_side=True):
            pass
        conn.close()

    t = threading.Thread(target=serve)
    t.start()

    async def get() -> None:
        async with httpx.AsyncClient() as client:
            await client.get(f"https://127.0.0.1:{port}/v2/")

    try:
        with pytest.raises(httpx.ConnectError) as info:
            asyncio.run(get())
    finally:
        t.join(timeout=60)
        listener.close()
    assert describe(info.value).message == (
        f"failed to connect to 127.0.0.1:{port}: tls: certificate verify failed: "
        "self-signed certificate")


def test_unexpected_errors_are_one_line() -> None:
    failure = describe(RuntimeError("bug"))
    assert failure.exit_code == 1
    assert "\n" not in failure.message and "--debug" in failure.message


def test_naming_adds_the_argument_once() -> None:
    with pytest.raises(errdefs.InvalidArgument) as info, errors.naming("sha256:zz"):
        raise errdefs.InvalidArgument("invalid checksum digest length")
    assert str(info.value) == "sha256:zz: invalid checksum digest length: invalid argument"
    with pytest.raises(errdefs.InvalidArgument) as info, errors.naming("sha256:zz"):
        raise errdefs.InvalidArgument('"sha256:zz" failed validation')
    assert str(info.value) == '"sha256:zz" failed validation: invalid argument'


def test_every_command_and_group_shows_an_example(capsys: pytest.CaptureFixture[str]
                                                  ) -> None:
    app.parser()
    assert len(app.EXAMPLES) > 50
    for prog, example in app.EXAMPLES.items():
        assert example.startswith("berth "), prog
        words = prog.split()[1:]
        with pytest.raises(SystemExit) as info:
            app.parser().parse_args([*words, "--help"])
        assert info.value.code == 0
        assert f"example:\n  {example}\n" in capsys.readouterr().out, prog
    with pytest.raises(SystemExit):
        app.parser().parse_args(["--help"])
    assert "examples:\n  berth images pull" in capsys.readouterr().out


def _berth(*args: str) -> subprocess.CompletedProcess[str]:
    # A process of its own: main() sets up logging for the process's stderr.
    return subprocess.run([sys.executable, "-m", "berth.core.cli", *args], capture_output=True,
                          text=True, timeout=120, stdin=subprocess.DEVNULL)


def test_main_prints_one_line_and_a_traceback_only_with_debug(tmp_path: Path) -> None:
    address = str(tmp_path / "none.sock")
    r = _berth("--address", address, "images", "ls")
    assert (r.returncode, r.stderr) == (
        1, f'berth: failed to dial "{address}": connect: no such file or directory '
           "(daemon not reachable)\n")
    r = _berth("--debug", "--address", address, "images", "ls")
    assert r.returncode == 1
    assert "Traceback" in r.stderr and r.stderr.endswith("(daemon not reachable)\n")


def test_usage_mistakes_are_two_lines() -> None:
    r = _berth("images", "pul")
    assert r.returncode == 2
    lines = r.stderr.splitlines()
    assert lines[0].startswith("berth images: argument COMMAND: invalid choice: 'pul'")
    assert lines[1:] == ["See 'berth images --help'."]
