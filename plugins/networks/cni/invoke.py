"""Running one CNI plugin binary: libcni's conventions for env, stdin and errors.

The plugin gets berthd's environment plus ``CNI_COMMAND``, ``CNI_CONTAINERID``,
``CNI_NETNS``, ``CNI_IFNAME``, ``CNI_ARGS`` and ``CNI_PATH``; its network config on stdin
(with ``name``, ``cniVersion``, ``prevResult`` and the ``runtimeConfig`` it declared
capabilities for); its result, or a CNI error object, on stdout.
"""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass
from typing import Any

import trio

from berth.core import errdefs


@dataclass(frozen=True)
class Invocation:
    command: str            # ADD, DEL, CHECK, VERSION
    container_id: str = ""
    netns: str = ""
    ifname: str = ""
    args: str = "IgnoreUnknown=1"
    path: str = ""          # CNI_PATH

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update({"CNI_COMMAND": self.command, "CNI_CONTAINERID": self.container_id,
                    "CNI_NETNS": self.netns, "CNI_IFNAME": self.ifname,
                    "CNI_ARGS": self.args, "CNI_PATH": self.path})
        return env


def plugin_error(kind: str, command: str, rc: int, stdout: bytes, stderr: bytes) -> str:
    """libcni's ``plugin type="X" failed (add): msg``, from the CNI error object if any."""
    text = ""
    try:
        doc = json.loads(stdout) if stdout.strip() else None
    except ValueError:
        doc = None
    if isinstance(doc, dict) and ("msg" in doc or "code" in doc):
        text = str(doc.get("msg", ""))
        if doc.get("details"):
            text += f"; {doc['details']}"
        if not text:
            text = f"error code {doc.get('code')}"
    if not text:
        text = (stderr or stdout).decode(errors="replace").strip() or f"exit status {rc}"
    return f'plugin type="{kind}" failed ({command.lower()}): {text}'


async def run(binary: str, kind: str, inv: Invocation, stdin: bytes, timeout: float
              ) -> Any:
    """Run the plugin; its decoded stdout (None when empty), or Unknown with its error."""
    with trio.move_on_after(timeout) as scope:
        try:
            p = await trio.run_process([binary], stdin=stdin, capture_stdout=True,
                                       capture_stderr=True, env=inv.env(), check=False)
        except FileNotFoundError:
            raise errdefs.FailedPrecondition(
                f'failed to find plugin "{kind}" in path [{inv.path}]', raw=True) from None
        except OSError as e:
            raise errdefs.Unknown(f'plugin type="{kind}": {e.strerror or e}', raw=True) \
                from None
    if scope.cancelled_caught:
        raise errdefs.DeadlineExceeded(
            f'plugin type="{kind}" ({inv.command.lower()}) did not finish in {timeout:g}s',
            raw=True)
    assert isinstance(p, subprocess.CompletedProcess)
    if p.returncode != 0:
        raise errdefs.Unknown(plugin_error(kind, inv.command, p.returncode, p.stdout,
                                           p.stderr), raw=True)
    if not p.stdout.strip():
        return None
    try:
        return json.loads(p.stdout)
    except ValueError as e:
        raise errdefs.Unknown(f'plugin type="{kind}" ({inv.command.lower()}) printed no '
                              f"JSON: {e}", raw=True) from None
