"""CRI Exec, Attach and PortForward through berthd's streaming server, against real pods.

The pod has its own network namespace (CNI bridge); its "web" container serves a 1 MB file
and an echo CGI with busybox httpd on a port nobody published, so only port-forward (which
enters the pod's namespace) reaches it. The client is tests/cri_stream_client.py.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import trio

from berth.core.api.runtime import v1 as api
from tests import daemons
from tests.cri import CRIClient
from tests.cri_stream_client import (
    StreamClientError,
    key_pair,
    spdy_connect,
    spdy_exec,
    spdy_port_forward,
    spdy_remotecommand,
    trusting,
    ws_connect,
    ws_exec,
    ws_remotecommand,
)
from tests.integration.test_cri_images import base  # noqa: F401 - fixture
from tests.integration.test_cri_pods import (
    HANG_GUARD,
    _cni_daemon,
    _wait,
    container_config,
    pod_config,
)

if TYPE_CHECKING:
    from tests.images import Image, RegistryServer

pytest_plugins = ("tests.images",)
pytestmark = pytest.mark.root

PORT = 8080
WEB = (
    "mkdir -p /www/cgi-bin && head -c 1048576 /dev/urandom > /www/big && "
    "printf '#!/bin/sh\\nprintf \"Content-Type: application/octet-stream\\\\r\\\\n\\\\r\\\\n\"\\n"
    "head -c \"$CONTENT_LENGTH\"\\n' > /www/cgi-bin/echo && chmod +x /www/cgi-bin/echo && "
    f"exec httpd -f -p {PORT} -h /www"
)


class Pod:
    def __init__(self, d: daemons.Daemon, c: CRIClient, sid: str, web: str, talk: str) -> None:
        self.d, self.c, self.sid, self.web, self.talk = d, c, sid, web, talk
        self.config = api.PodSandboxConfig()

    def exec_url(self, cid: str, cmd: list[str], **kw: bool) -> str:
        return self.c.runtime("exec", api.ExecRequest(container_id=cid, cmd=cmd, **kw)).url

    def pf_url(self, *ports: int) -> str:
        return self.c.runtime("port_forward", api.PortForwardRequest(
            pod_sandbox_id=self.sid, port=list(ports))).url


@pytest.fixture
def pod(base: Path, registry: RegistryServer,  # noqa: F811
        busybox_oci: tuple[Path, Image]) -> Iterator[Pod]:
    from tests.integration.test_networks import remove_bridge

    d, bridge = _cni_daemon(base, registry, busybox_oci[1])
    try:
        with CRIClient(d.state / "cri.sock") as c:
            c.image("pull_image", api.PullImageRequest(image=api.ImageSpec(image="busybox")))
            config = pod_config(base / "logs", "stream")
            config.linux.security_context.namespace_options.network = api.NamespaceMode.POD
            sid = c.runtime("run_pod_sandbox", api.RunPodSandboxRequest(
                config=config, runtime_handler="berth")).pod_sandbox_id
            ids = []
            for name, script, kw in (
                    ("web", WEB, {}),
                    ("talk", "echo ready; while read line; do echo got-$line; done; "
                             "exec sleep 1000", {"stdin": True})):
                cid = c.runtime("create_container", api.CreateContainerRequest(
                    pod_sandbox_id=sid, sandbox_config=config,
                    config=container_config(name, script, **kw))).container_id
                c.runtime("start_container", api.StartContainerRequest(container_id=cid))
                ids.append(cid)
            p = Pod(d, c, sid, *ids)
            p.config = config

            def serving() -> bool:
                r = c.runtime("exec_sync", api.ExecSyncRequest(
                    container_id=p.web, cmd=["wget", "-q", "-O", "/dev/null",
                                             f"http://127.0.0.1:{PORT}/big"]))
                return r.exit_code == 0
            _wait(serving, "httpd in the pod")
            try:
                yield p
            finally:
                p.c.close()  # a test that restarts berthd has its own client: p.c
            with CRIClient(d.state / "cri.sock") as c2:
                c2.runtime("stop_pod_sandbox", api.StopPodSandboxRequest(pod_sandbox_id=sid))
                c2.runtime("remove_pod_sandbox",
                           api.RemovePodSandboxRequest(pod_sandbox_id=sid))
    finally:
        d.stop()
        remove_bridge(bridge)


async def _guarded(fn) -> None:  # type: ignore[no-untyped-def]
    # Bounds a hang; nothing is timed by it.
    with trio.fail_after(HANG_GUARD):
        await fn()


def _big(p: Pod) -> bytes:
    r = p.c.runtime("exec_sync", api.ExecSyncRequest(container_id=p.web, cmd=["cat", "/www/big"]))
    assert len(r.stdout) == 1 << 20
    return r.stdout


def _body(response: bytes) -> bytes:
    head, sep, body = response.partition(b"\r\n\r\n")
    assert sep and head.startswith(b"HTTP/1."), response[:200]
    return body


def test_exec_both_streams_and_exit_code(pod: Pod) -> None:
    script = ["sh", "-c", "echo out; echo err >&2; exit 3"]

    async def run() -> None:
        res = await spdy_exec(pod.exec_url(pod.web, script, stdout=True, stderr=True))
        assert (res.stdout, res.stderr, res.exit_code) == (b"out\n", b"err\n", 3)
        res = await ws_exec(pod.exec_url(pod.web, script, stdout=True, stderr=True))
        assert (res.stdout, res.stderr, res.exit_code) == (b"out\n", b"err\n", 3)
        res = await ws_exec(pod.exec_url(pod.web, script, stdout=True, stderr=True),
                            "v4.base64.channel.k8s.io")
        assert (res.stdout, res.stderr, res.exit_code) == (b"out\n", b"err\n", 3)
        # stdin through, half-closed, 1 MB.
        data = os.urandom(1 << 20)
        url = pod.exec_url(pod.web, ["sh", "-c", "cat; echo done"], stdin=True, stdout=True)
        res = await spdy_exec(url, stdin=data, stderr=False)
        assert res.stdout == data + b"done\n" and res.exit_code == 0
    trio.run(_guarded, run)


def test_exec_tty_and_resize(pod: Pod) -> None:
    async def run() -> None:
        url = pod.exec_url(pod.web, ["sh"], tty=True, stdin=True, stdout=True)
        async with spdy_remotecommand(url, stdin=True, tty=True) as rc:
            await rc.resize(80, 24)
            await rc.send_stdin(b"echo typed-$((40+2))\n")
            assert b"typed-42" in await rc.read_stdout_until(b"typed-42")
            await rc.resize(123, 45)
            await _see_size(rc, b"45 123")
            await rc.send_stdin(b"exit 5\n")
            res = await rc.finish()
        assert res.exit_code == 5
        url = pod.exec_url(pod.web, ["sh"], tty=True, stdin=True, stdout=True)
        async with ws_remotecommand(url) as rc:
            await rc.send_stdin(b"echo typed-$((40+3))\n")
            assert b"typed-43" in await rc.read_stdout_until(b"typed-43")
            await rc.resize(91, 17)
            await _see_size(rc, b"17 91")
            await rc.send_stdin(b"exit 0\n")
            res = await rc.finish()
        assert res.exit_code == 0
    trio.run(_guarded, run)


def test_port_forward_into_the_pod(pod: Pod) -> None:
    big = _big(pod)
    upload = os.urandom(1 << 20)
    post = (f"POST /cgi-bin/echo HTTP/1.0\r\nContent-Length: {len(upload)}\r\n\r\n".encode()
            + upload)

    async def run() -> None:
        async with spdy_connect(pod.pf_url(), ["portforward.k8s.io"]) as (c, _):
            for i in range(20):
                got, err = await spdy_port_forward(c, PORT, i, b"GET /big HTTP/1.0\r\n\r\n")
                assert err == b"" and _body(got) == big, i
            results: dict[int, bytes] = {}

            async def one(i: int) -> None:
                got, _ = await spdy_port_forward(c, PORT, 100 + i, post)
                results[i] = _body(got)
            async with trio.open_nursery() as n:
                for i in range(5):
                    n.start_soon(one, i)
            assert all(results[i] == upload for i in range(5))
            got, err = await spdy_port_forward(c, 9, 999, b"x")
            assert got == b"" and b"error forwarding port 9" in err
        # WebSocket: one connection per forwarded connection, the same counts and sizes.
        for i in range(20):
            got = await _ws_forward(pod.pf_url(PORT), b"GET /big HTTP/1.0\r\n\r\n")
            assert _body(got) == big, i
        urls = [pod.pf_url(PORT) for _ in range(5)]
        ws_results: dict[int, bytes] = {}

        async def ws_one(i: int) -> None:
            ws_results[i] = _body(await _ws_forward(urls[i], post))
        async with trio.open_nursery() as n:
            for i in range(5):
                n.start_soon(ws_one, i)
        assert all(ws_results[i] == upload for i in range(5))
    trio.run(_guarded, run)


async def _ws_forward(url: str, payload: bytes) -> bytes:
    """One forwarded connection over WebSocket (v4.channel.k8s.io): what the pod's server
    sent back until it closed, without the port prefix."""
    async with ws_connect(url, ["v4.channel.k8s.io"], nch=2) as w:
        await w.send(0, payload)
        got = await w.read_all(0)
    assert got[:2] == PORT.to_bytes(2, "little"), got[:2]
    return got[2:]


def test_attach_sees_output_and_sends_stdin(pod: Pod) -> None:
    async def run() -> None:
        url = pod.c.runtime("attach", api.AttachRequest(
            container_id=pod.talk, stdin=True, stdout=True, stderr=True)).url
        async with spdy_remotecommand(url, stdin=True) as rc:
            await rc.send_stdin(b"hello\n")
            assert b"got-hello" in await rc.read_stdout_until(b"got-hello")
        url = pod.c.runtime("attach", api.AttachRequest(
            container_id=pod.talk, stdin=True, stdout=True, stderr=True)).url
        async with ws_remotecommand(url) as rc:
            await rc.send_stdin(b"again\n")
            assert b"got-again" in await rc.read_stdout_until(b"got-again")
    trio.run(_guarded, run)


def test_attach_after_berthd_restart(pod: Pod) -> None:
    """kill -9 of berthd and a restart: attach to containers the old berthd started sees
    their output and sends them stdin (the new berthd re-opens their stdio FIFOs, which
    their shims kept open), without and with a terminal."""
    config = pod.config
    typist = pod.c.runtime("create_container", api.CreateContainerRequest(
        pod_sandbox_id=pod.sid, sandbox_config=config,
        config=container_config("typist", "exec sh", stdin=True, tty=True))).container_id
    pod.c.runtime("start_container", api.StartContainerRequest(container_id=typist))
    pod.d.kill()
    pod.c.close()
    pod.d.start()
    pod.c = c = CRIClient(pod.d.state / "cri.sock")

    def attach_url(cid: str, tty: bool = False) -> str:
        return c.runtime("attach", api.AttachRequest(
            container_id=cid, stdin=True, stdout=True, stderr=not tty, tty=tty)).url

    async def run() -> None:
        async with spdy_remotecommand(attach_url(pod.talk), stdin=True) as rc:
            await rc.send_stdin(b"after-restart\n")
            assert b"got-after-restart" in await rc.read_stdout_until(b"got-after-restart")
        async with ws_remotecommand(attach_url(pod.talk)) as rc:
            await rc.send_stdin(b"again\n")
            assert b"got-again" in await rc.read_stdout_until(b"got-again")
        async with spdy_remotecommand(attach_url(typist, tty=True), stdin=True,
                                      tty=True) as rc:
            await rc.send_stdin(b"echo typed-$((40+2))\n")
            assert b"typed-42" in await rc.read_stdout_until(b"typed-42")
    trio.run(_guarded, run)
    # The log still gets what the container writes, beside the attached client.
    log = Path(config.log_directory) / "talk" / "0.log"
    _wait(lambda: b"got-again" in log.read_bytes(), "the talk container's log")


def test_tls_streaming_with_a_key_pair(base: Path, registry: RegistryServer,  # noqa: F811
                                       busybox_oci: tuple[Path, Image]) -> None:
    """enable_tls_streaming with x509_key_pair_streaming: berthd's streaming server shows
    that certificate (a client trusting it alone completes an exec); a pair that does not
    load fails the CRI plugin at start, named in the log, and no CRI socket opens."""
    from tests.cri import cri_config, hosts_dir
    from tests.images import push_image

    push_image(registry, "library/busybox", "latest", busybox_oci[1])
    cert, key = key_pair(base, "berth-streaming")
    _, other_key = key_pair(base, "other")
    (base / "net.d").mkdir()

    def daemon(name: str, tls_key: Path) -> daemons.Daemon:
        config = cri_config(
            base / f"{name}.toml", enable_tls_streaming=True,
            x509_key_pair_streaming={"tls_cert_file": str(cert), "tls_key_file": str(tls_key)},
            registry={"config_path": str(hosts_dir(base, "docker.io", registry.host))},
            cni={"conf_dir": str(base / "net.d"), "bin_dir": "/usr/lib/cni"})
        return daemons.berthd(base / name, "--config", str(config))

    d = daemon("good", key).start()
    try:
        with CRIClient(d.state / "cri.sock") as c:
            c.image("pull_image", api.PullImageRequest(image=api.ImageSpec(image="busybox")))
            config = pod_config(base / "logs", "tls")
            sid = c.runtime("run_pod_sandbox", api.RunPodSandboxRequest(
                config=config, runtime_handler="berth")).pod_sandbox_id
            cid = c.runtime("create_container", api.CreateContainerRequest(
                pod_sandbox_id=sid, sandbox_config=config,
                config=container_config("sleeper", "exec sleep 1000"))).container_id
            c.runtime("start_container", api.StartContainerRequest(container_id=cid))
            url = c.runtime("exec", api.ExecRequest(
                container_id=cid, cmd=["sh", "-c", "echo out; echo err >&2; exit 3"],
                stdout=True, stderr=True)).url
            assert url.startswith("https://127.0.0.1:")
            res = trio.run(lambda: spdy_exec(url, tls=trusting(cert)))
            assert (res.stdout, res.stderr, res.exit_code) == (b"out\n", b"err\n", 3)
            c.runtime("stop_pod_sandbox", api.StopPodSandboxRequest(pod_sandbox_id=sid))
            c.runtime("remove_pod_sandbox", api.RemovePodSandboxRequest(pod_sandbox_id=sid))
    finally:
        d.stop()

    bad = daemon("bad", other_key).start()
    try:
        _wait(lambda: "failed to load x509 key pair for stream server" in bad.logs(),
              "the key pair's error in berthd's log")
        line = next(x for x in bad.logs().splitlines() if "x509 key pair" in x)
        assert "failed to load plugin" in line and "tls_key_file is not the PEM private key" \
            in line, line
        plugins = daemons.ctr_ok(bad.address, "plugins", "ls").out
        assert any("cri" in x and "error" in x for x in plugins.splitlines()), plugins
        assert not (bad.state / "cri.sock").exists()
    finally:
        bad.stop()


def test_garbage_closes_only_that_connection(pod: Pod) -> None:
    """berthd's streaming server: random bytes, a frame with a huge length, a header block
    that does not inflate and a zip bomb after the upgrade each close that connection, and
    berthd goes on serving others."""
    from tests.unit.test_cri_streaming_server import (
        ends_in_goaway,
        garbage_after_upgrade,
        garbage_cases,
    )

    async def run() -> None:
        for name, garbage in garbage_cases().items():
            url = pod.exec_url(pod.web, ["sleep", "30"], stdout=True, stderr=True)
            assert ends_in_goaway(await garbage_after_upgrade(url, garbage)), name
            res = await spdy_exec(pod.exec_url(pod.web, ["echo", "alive"], stdout=True),
                                  stderr=False)
            assert res.stdout == b"alive\n", name
    trio.run(_guarded, run)
    assert pod.d.proc is not None and pod.d.proc.poll() is None


def _berthd_fds(d: daemons.Daemon) -> int:
    assert d.proc is not None
    return len(os.listdir(f"/proc/{d.proc.pid}/fd"))


def test_tokens_and_idle_connections(pod: Pod) -> None:
    async def run() -> None:
        url = pod.exec_url(pod.web, ["true"], stdout=True)
        assert (await spdy_exec(url, stderr=False)).exit_code == 0
        with pytest.raises(StreamClientError, match="404"):
            await spdy_exec(url, stderr=False)
        host_port = url.split("/")[2]
        host, port = host_port.rsplit(":", 1)
        before = _berthd_fds(pod.d)
        idle = [await trio.open_tcp_stream(host, int(port)) for _ in range(200)]
        try:
            await trio.sleep(0.5)
            # berthd keeps at most its pending limit (64) of them, not 200.
            assert _berthd_fds(pod.d) - before <= 64 + 8
            res = await spdy_exec(pod.exec_url(pod.web, ["echo", "alive"], stdout=True),
                                  stderr=False)
            assert res.stdout == b"alive\n"
        finally:
            for s in idle:
                await s.aclose()
    trio.run(_guarded, run)


async def _see_size(rc, needle: bytes) -> None:  # type: ignore[no-untyped-def]
    """Ask ``stty size`` until the resize has landed: the resize and stdin streams are
    separate, so the first ask may run before the terminal changed (the kubelet's race too)."""
    for _ in range(100):
        await rc.send_stdin(b"stty size\n")
        with trio.move_on_after(0.5):
            # read_stdout_until also returns at the stream's end, needle or not.
            if needle in await rc.read_stdout_until(needle):
                return
            break
    raise AssertionError(f"terminal never showed {needle!r}")


def _host_pids(argv: list[str]) -> list[int]:
    """Processes on the host (the test's root sees every pid namespace) running argv."""
    want = b"\0".join(a.encode() for a in argv) + b"\0"
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                if Path(f"/proc/{name}/cmdline").read_bytes() == want:
                    found.append(int(name))
            except OSError:
                pass  # gone meanwhile
    return found


def test_client_hanging_up_kills_its_exec(pod: Pod) -> None:
    """A client gone ends its exec, also when it hangs up the moment the process exists:
    runc exec's process runs before Start has its pid, and a Kill then met "process not
    created" and left the process running (this failed under load before berthd let Start
    finish and the shim made Kill wait for it)."""
    def sleeping() -> bool:
        # Looked for on the host, not through the CRI client: this runs in a worker thread,
        # and the client's loop belongs to the test's thread (under trio-asyncio's loop
        # policy, which another test module installs, a call from a thread fails).
        return bool(_host_pids(["sleep", "777"]))

    async def run() -> None:
        url = pod.exec_url(pod.web, ["sleep", "777"], stdout=True, stderr=True)
        async with spdy_remotecommand(url):
            await trio.to_thread.run_sync(_wait, sleeping, "the exec running")
    trio.run(_guarded, run)
    _wait_gone(pod, lambda: not sleeping())

    # Hang up as soon as the process shows on the host, through both transports, with and
    # without a terminal: most of these land while Start is still under way.
    for i in range(12):
        argv = ["sleep", str(7000 + i)]
        tty = i % 2 == 1
        url = pod.exec_url(pod.web, argv, stdout=True, stderr=not tty, tty=tty,
                           stdin=tty)

        async def hang_up_early(url: str = url, argv: list[str] = argv, i: int = i,
                                tty: bool = tty) -> None:
            client = (spdy_remotecommand(url, stdin=tty, tty=tty) if i % 4 < 2
                      else ws_remotecommand(url))
            async with client:
                for _ in range(int(HANG_GUARD * 1000)):
                    if _host_pids(argv):
                        return
                    await trio.sleep(0.001)
        trio.run(_guarded, hang_up_early)
        _wait_gone(pod, lambda argv=argv: not _host_pids(argv), " ".join(argv))


def test_exec_sync_whose_caller_goes_is_killed(pod: Pod) -> None:
    """ExecSync with no timeout of its own, whose caller's deadline passes: the command is
    killed (as containerd does), not left running with nobody to read its output."""
    req = api.ExecSyncRequest(container_id=pod.web, cmd=["sleep", "555"])
    with pytest.raises(TimeoutError):
        pod.c.run(pod.c.runtime_stub.exec_sync(req, timeout=2))
    _wait_gone(pod, lambda: not _host_pids(["sleep", "555"]), "sleep 555")
    # Hung up before the process could even start: nothing is left either.
    for i in range(5):
        argv = ["sleep", str(5550 + i)]
        req = api.ExecSyncRequest(container_id=pod.web, cmd=argv)
        with pytest.raises(TimeoutError):
            pod.c.run(pod.c.runtime_stub.exec_sync(req, timeout=0.01 * (i + 1)))
        _wait_gone(pod, lambda argv=argv: not _host_pids(argv), " ".join(argv))


def _wait_gone(pod: Pod, gone, what: str = "sleep 777") -> None:  # type: ignore[no-untyped-def]
    try:
        _wait(gone, f"{what} killed after its client hung up")
    except TimeoutError:
        tail = "\n".join(pod.d.logs().splitlines()[-60:])
        raise AssertionError(f"the exec outlived its client; berthd's log ends:\n{tail}") from None
