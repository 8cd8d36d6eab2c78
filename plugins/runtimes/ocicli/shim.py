"""What berth's shim calls to run containers with a runc-compatible binary."""

from __future__ import annotations

import subprocess
from pathlib import Path

from berth.core.oci.reaper import Reaper
from berth.core.shim.options import RuntimeChoice
from berth.plugins.runtimes.ocicli.runtime import Runtime, resolve


def new(choice: RuntimeChoice, bundle: str, reaper: Reaper) -> Runtime:
    return Runtime(choice.root, reaper, binary=choice.binary, log=Path(bundle) / "log.json",
                   systemd_cgroup=choice.systemd_cgroup, no_pivot=choice.no_pivot_root,
                   no_new_keyring=choice.no_new_keyring)


def force_delete(choice: RuntimeChoice, container_id: str) -> str:
    """``<binary> delete --force``, run from the short-lived ``delete`` action (no Reaper)."""
    try:
        binary = resolve(choice.binary)
    except Exception as exc:  # noqa: BLE001 - reported as a warning, like Go's shim
        return f"failed to remove runc container: {exc}"
    done = subprocess.run([binary, "--root", choice.root, "delete", "--force", container_id],
                          capture_output=True, text=True)
    if done.returncode != 0:
        return f"failed to remove runc container: {done.stderr.strip()}"
    return ""
