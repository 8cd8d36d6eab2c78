"""The real containerd runs containers through berth's shim (``io.containerd.berth.v1``).

containerd resolves the runtime name to the binary ``containerd-shim-berth-v1`` on its
PATH, so the daemon is started with the virtualenv's bin folder (where pip installed
the console script) in front of PATH. The rootfs is Debian's busybox-static with its
applet links, passed with ``ctr run --rootfs``.

External runtimes: ctr 1.6 accepts ``--runc-binary`` only together with
``--runtime io.containerd.runc.v2`` (it refuses it for any other runtime, see
``test_ctr_refuses_runc_binary_for_other_runtimes``), so a runc-compatible binary
reaches berth's shim either as ``runtimeoptions.v1.Options`` (``ctr run
--runtime-config-path``, the way CRI configures non-runc runtimes) or as
``containerd.runc.v1.Options{binary_name}`` set by a gRPC client creating the
container, which is what the runc path of CRI and other clients send.

Fixtures stop the daemon, the shims' zygote and anything a failure left running under
the test's folder, and remove the test namespace's cgroups.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import betterproto.lib.google.protobuf as pb
import pytest

from berth.core.api.containerd.runc.v1 import Options as RuncOptions
from berth.core.api.containerd.services.containers import v1 as containers_api
from berth.core.shim import zygote
from tests import daemons
from tests.integration.test_shim import (
    alive,
    busybox_rootfs,
    cgroup_dirs,
    crun_layout,
    mounts_under,
    pids_mentioning,
    remove_cgroup_tree,
)

pytestmark = [pytest.mark.interop, pytest.mark.root]

RUNTIME = "io.containerd.berth.v1"
SHIM_DIR = os.path.dirname(sys.executable)


@dataclass
class Env:
    daemon: daemons.Daemon
    base: Path
    rootfs: Path
    namespace: str

    def ctr(self, *args: str, timeout: float = 60) -> daemons.Result:
        return daemons.ctr(self.daemon.address, *args, namespace=self.namespace,
                           timeout=timeout)

    def run(self, name: str, *command: str, extra: tuple[str, ...] = ()) -> daemons.Result:
        return self.ctr("run", "--runtime", RUNTIME, *extra, "--rm", "--rootfs",
                        str(self.rootfs), name, *command)

    def runtime_config(self, binary: str) -> Path:
        path = self.base / f"{binary}.toml"
        path.write_text(f'binary_name = "{binary}"\n')
        return path


@pytest.fixture
def env() -> Iterator[Env]:
    assert os.path.exists(os.path.join(SHIM_DIR, "containerd-shim-berth-v1")), \
        "the shim's console script is missing: pip install -e . in the virtualenv"
    base = Path(tempfile.mkdtemp(prefix="berth-shimc-", dir="/tmp"))
    base.chmod(0o755)
    namespace = f"berth-shim-{uuid.uuid4().hex[:8]}"
    path = SHIM_DIR + os.pathsep + os.environ.get("PATH", "/usr/bin:/bin")
    daemon = daemons.containerd(base / "containerd", env={"PATH": path})
    try:
        daemon.start()
        yield Env(daemon, base, busybox_rootfs(base / "rootfs"), namespace)
    finally:
        # Tasks and containers a failed test left: remove them through containerd first.
        if daemon.proc is not None and daemon.proc.poll() is None:
            listed = daemons.ctr(daemon.address, "tasks", "ls", "-q", namespace=namespace)
            for task in listed.out.split():
                daemons.ctr(daemon.address, "tasks", "kill", "-s", "KILL", task,
                            namespace=namespace)
                daemons.ctr(daemon.address, "tasks", "rm", "-f", task, namespace=namespace)
            listed = daemons.ctr(daemon.address, "containers", "ls", "-q", namespace=namespace)
            for container in listed.out.split():
                daemons.ctr(daemon.address, "containers", "rm", container,
                            namespace=namespace)
        daemon.stop()
        zygote.stop(zygote.zygote_path(str(daemon.address)))
        for pid in pids_mentioning(str(base)):
            os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while pids_mentioning(str(base)) and time.monotonic() < deadline:
            time.sleep(0.02)
        for point in sorted(mounts_under(base), key=len, reverse=True):
            subprocess.run(["umount", "-l", point], check=False)
        remove_cgroup_tree(namespace)
        leftovers = pids_mentioning(str(base))
        shutil.rmtree(base, ignore_errors=True)
        assert leftovers == set()
        assert cgroup_dirs(namespace) == []


def shim_log(env: Env) -> str:
    """containerd copies each shim's log FIFO into its own output."""
    return env.daemon.logs()


def test_ctr_run_prints_hi_and_exit_codes_pass_through(env: Env):
    r = env.run("t1", "echo", "hi")
    assert (r.rc, r.out, r.err) == (0, "hi\n", "")
    r = env.run("t2", "sh", "-c", "exit 3")
    assert (r.rc, r.out) == (3, "")
    r = env.run("t3", "sh", "-c", "echo to-stderr >&2; exit 1")
    assert (r.rc, r.out, r.err) == (1, "", "to-stderr\n")
    # --rm removed everything: no task, no container, no shim serving them.
    assert env.ctr("tasks", "ls", "-q").out == ""
    assert env.ctr("containers", "ls", "-q").out == ""
    logs = shim_log(env)
    assert "msg=created" in logs and "oci_runtime=berth" in logs
    assert "level=error" not in "\n".join(
        line for line in logs.splitlines() if "runtime=io.containerd.berth.v1" in line)
    for topic in ("/tasks/create", "/tasks/start", "/tasks/exit", "/tasks/delete"):
        assert f'msg="event forwarded" ns={env.namespace} topic={topic}' in logs


def test_ctr_refuses_runc_binary_for_other_runtimes(env: Env):
    """Why the runc tests below do not use ``--runc-binary``: ctr itself refuses it."""
    r = env.run("t1", "echo", "hi", extra=("--runc-binary", "runc"))
    assert r.rc != 0
    assert 'only supported for "io.containerd.runc.v2" runtime' in r.err


def test_runc_through_berth_shim_with_runtime_config_path(env: Env):
    # Without an image, ctr's spec sets no PATH: runc needs absolute paths.
    config = env.runtime_config("runc")
    r = env.run("r1", "/bin/echo", "hi", extra=("--runtime-config-path", str(config)))
    assert (r.rc, r.out, r.err) == (0, "hi\n", "")
    r = env.run("r2", "/bin/sh", "-c", "exit 3", extra=("--runtime-config-path", str(config)))
    assert r.rc == 3
    assert shim_log(env).count("oci_runtime=runc") == 2


def test_runc_binary_name_in_runc_options_through_grpc(env: Env):
    """A client that sets ``containerd.runc.v1.Options{binary_name: "runc"}`` on the
    container (ctr cannot, for a non-runc runtime): ``ctr task start`` runs it with runc."""
    script = env.rootfs / "bin" / "via-grpc"
    script.write_text("#!/bin/sh\necho via-grpc\nexit 4\n")
    script.chmod(0o755)
    # (ctr containers create would take a "-c" in the command for its --config flag.)
    created = env.ctr("containers", "create", "--runtime", RUNTIME, "--rootfs",
                      str(env.rootfs), "g1", "/bin/via-grpc")
    assert created.rc == 0, created.err

    async def set_runtime_options() -> None:
        from grpclib.client import Channel

        channel = Channel(path=str(env.daemon.address))
        try:
            stub = containers_api.ContainersStub(
                channel, metadata={"containerd-namespace": env.namespace})
            container = (await stub.get(containers_api.GetContainerRequest(id="g1"))).container
            container.runtime = containers_api.ContainerRuntime(
                name=RUNTIME, options=pb.Any(type_url="containerd.runc.v1.Options",
                                             value=bytes(RuncOptions(binary_name="runc"))))
            # The runtime of a container cannot be updated: recreate it.
            await stub.delete(containers_api.DeleteContainerRequest(id="g1"))
            await stub.create(containers_api.CreateContainerRequest(container=container))
        finally:
            channel.close()

    asyncio.run(set_runtime_options())
    r = env.ctr("tasks", "start", "g1")
    assert (r.rc, r.out) == (4, "via-grpc\n")
    assert env.ctr("tasks", "ls", "-q").out == ""  # ctr tasks start deletes the task
    assert env.ctr("containers", "rm", "g1").rc == 0
    assert "oci_runtime=runc" in shim_log(env)


def test_crun_through_berth_shim(env: Env):
    """crun 1.8 refuses a hybrid cgroup layout (v1 controllers plus a cgroup2 mount, as on
    this machine): there the refusal must reach ctr intact; elsewhere crun runs it."""
    assert shutil.which("crun"), "crun is needed (tests/setup-host.sh)"
    config = env.runtime_config("crun")
    r = env.run("c1", "/bin/echo", "hi", extra=("--runtime-config-path", str(config)))
    if crun_layout() == "hybrid":
        assert r.rc != 0
        assert "OCI runtime create failed: cgroups in hybrid mode not supported" in r.err
    else:
        assert (r.rc, r.out) == (0, "hi\n")


def test_detached_task_exec_ps_pause_metrics_kill(env: Env):
    r = env.ctr("run", "--runtime", RUNTIME, "-d", "--rootfs", str(env.rootfs), "d1",
                "sleep", "300")
    assert r.rc == 0, r.err
    tasks = env.ctr("tasks", "ls")
    assert "d1" in tasks.out and "RUNNING" in tasks.out
    r = env.ctr("tasks", "exec", "--exec-id", "e1", "d1", "sh", "-c", "echo in-exec; exit 6")
    assert (r.rc, r.out) == (6, "in-exec\n")
    pids = env.ctr("tasks", "ps", "d1")
    assert pids.rc == 0 and len(pids.out.splitlines()) >= 2
    assert env.ctr("tasks", "pause", "d1").rc == 0
    assert "PAUSED" in env.ctr("tasks", "ls").out
    assert env.ctr("tasks", "resume", "d1").rc == 0
    assert "RUNNING" in env.ctr("tasks", "ls").out
    metrics = env.ctr("tasks", "metrics", "d1")
    assert metrics.rc == 0, metrics.err
    assert "memory.usage_in_bytes" in metrics.out and "pids.current" in metrics.out
    shim_pid = int(env.ctr("tasks", "ls").out.splitlines()[1].split()[1])
    assert alive(shim_pid)  # the task's pid, living under berth's shim
    assert env.ctr("tasks", "kill", "-s", "KILL", "d1").rc == 0
    deadline = time.monotonic() + 30
    while "STOPPED" not in env.ctr("tasks", "ls").out and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "STOPPED" in env.ctr("tasks", "ls").out
    assert env.ctr("tasks", "rm", "d1").rc == 0
    assert env.ctr("containers", "rm", "d1").rc == 0
