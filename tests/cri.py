"""A CRI client for tests, built from our runtime.v1 proto (grpclib), used as the kubelet
and crictl use a CRI runtime: one connection to the runtime's unix socket.

Tests run under pytest-trio; grpclib is asyncio, so the client owns an asyncio loop of
its own and every call is synchronous (``cri.runtime("version", VersionRequest())``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import textwrap
import time
from pathlib import Path
from typing import Any

from grpclib.client import Channel

from berth.core.api.runtime import v1 as api

# The kubelet's default per-call timeout is 2 minutes; pulls may take longer there, not here.
TIMEOUT = 120.0


def wait_served(address: Path, timeout: float = 30.0) -> None:
    """Until ``address`` accepts connections: berthd opens the CRI socket just after its
    own (the deadline bounds a failure; nothing is timed)."""
    deadline = time.monotonic() + timeout
    while True:
        s = socket.socket(socket.AF_UNIX)
        try:
            s.connect(str(address))
            return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{address} not served after {timeout}s") from None
            time.sleep(0.02)
        finally:
            s.close()


class CRIClient:
    def __init__(self, address: Path) -> None:
        self.address = address
        wait_served(address)
        self._loop = asyncio.new_event_loop()
        # grpclib binds a channel to the loop running when it is made.
        self._channel = self._loop.run_until_complete(self._open())
        self.runtime_stub = api.RuntimeServiceStub(self._channel, timeout=TIMEOUT)
        self.image_stub = api.ImageServiceStub(self._channel, timeout=TIMEOUT)

    async def _open(self) -> Channel:
        return Channel(path=str(self.address))

    def close(self) -> None:
        if self._loop.is_closed():
            return
        self._channel.close()
        self._loop.run_until_complete(asyncio.sleep(0))
        self._loop.close()

    def __enter__(self) -> CRIClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def watch_events(self) -> tuple[list[api.ContainerEventResponse], asyncio.Task[None]]:
        """GetContainerEvents in the background: events land in the list while other
        calls run the loop."""
        got: list[api.ContainerEventResponse] = []

        async def run() -> None:
            async for msg in self.runtime_stub.get_container_events(api.GetEventsRequest()):
                got.append(msg)

        return got, self._loop.create_task(run())

    def run(self, coro: Any) -> Any:
        """Run a coroutine of the stubs (``runtime_stub``, ``image_stub``) to its end."""
        return self._loop.run_until_complete(coro)

    def spawn(self, coro: Any) -> asyncio.Task[Any]:
        """Start a coroutine of the stubs; it runs while other calls run the loop."""
        return self._loop.create_task(coro)

    def pump(self) -> None:
        """Let background streams read what has arrived (the loop runs only in calls)."""
        self._loop.run_until_complete(asyncio.sleep(0.01))

    def stop_watch(self, task: asyncio.Task[None]) -> None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            self._loop.run_until_complete(task)

    def concurrently(self, *calls: tuple[str, Any]) -> list[Any]:
        """RuntimeService calls sent at once; results or exceptions, in order."""
        async def run() -> list[Any]:
            return await asyncio.gather(
                *(getattr(self.runtime_stub, m)(r) for m, r in calls), return_exceptions=True)
        return self._loop.run_until_complete(run())

    def runtime(self, method: str, req: Any) -> Any:
        return self._loop.run_until_complete(getattr(self.runtime_stub, method)(req))

    def image(self, method: str, req: Any) -> Any:
        return self._loop.run_until_complete(getattr(self.image_stub, method)(req))


def hosts_dir(base: Path, host: str, mirror: str, *, server: str = "http://127.0.0.1:1"
              ) -> Path:
    """A hosts.toml config path sending ``host`` to ``mirror`` (127.0.0.1), its server a
    closed local port so that nothing ever leaves the machine."""
    d = base / "certs.d"
    (d / host).mkdir(parents=True, exist_ok=True)
    (d / host / "hosts.toml").write_text(textwrap.dedent(f"""\
        server = "{server}"

        [host."http://{mirror}"]
          capabilities = ["pull", "resolve"]
        """))
    return d


def cri_config(path: Path, **section: Any) -> Path:
    """A berthd config file with the CRI plugin's section (nested tables as dicts)."""
    def render(prefix: str, table: dict[str, Any]) -> list[str]:
        lines = [f"[{prefix}]"]
        nested = []
        for k, v in table.items():
            if isinstance(v, dict):
                nested.append((k, v))
            elif isinstance(v, bool):
                lines.append(f"{k} = {'true' if v else 'false'}")
            elif isinstance(v, (int, float)):
                lines.append(f"{k} = {v}")
            elif isinstance(v, list):
                lines.append(f"{k} = {json.dumps([str(x) for x in v])}")
            else:
                lines.append(f"{k} = {json.dumps(str(v))}")
        for k, v in nested:
            key = k if k.replace("_", "").isalnum() else f'"{k}"'
            lines += ["", *render(f"{prefix}.{key}", v)]
        return lines

    # berth's own cni plugin writes its default network into its conf_dir: the test's
    # folder, never the host's /etc/berth/cni/net.d.
    own_cni = f'[plugins."io.berth.network.v1.cni"]\nconf_dir = "{path.parent / "berth-net.d"}"\n'
    path.write_text("\n".join(render('plugins."io.containerd.grpc.v1.cri"', section)) + "\n\n"
                    + own_cni)
    return path
