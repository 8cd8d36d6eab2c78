"""The ``delete`` action: clean up after a shim that is gone, print a DeleteResponse.

containerd runs ``<shim> -id ID -bundle B delete`` whenever its connection to a shim
closes (runtime/v2/shim.go cleanupAfterDeadShim) — after every normal Shutdown too —
and reads a protobuf ``DeleteResponse`` from stdout. Like the runc shim's manager.Stop:
force-delete the container in its runtime (when its state is still there), unmount
the rootfs, and report the init pid with exit status 137 (128 + SIGKILL).
"""

from __future__ import annotations

import os
import signal

from berth.core.shim import options, wire
from berth.core.shim.flags import Flags

EXIT_STATUS = 128 + signal.SIGKILL


def _mounted(path: str) -> bool:
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                fields = line.split(" ", 5)
                if len(fields) > 4 and fields[4] == path:
                    return True
    except OSError:
        return False
    return False


def _read_pid(bundle: str) -> int:
    try:
        with open(os.path.join(bundle, "init.pid")) as f:
            return int(f.read().strip() or 0)
    except (OSError, ValueError):
        return 0


def _runtime_delete(choice: options.RuntimeChoice, container_id: str) -> str:
    """Force-delete the container's runtime state; a warning, or ""."""
    state = os.path.join(choice.root, container_id)
    if not os.path.exists(state):
        return ""  # deleted through the Task API already: the usual case
    from berth.core.shim import runtimes

    try:
        return runtimes.force_delete(choice, container_id)
    except Exception as exc:  # noqa: BLE001 - reported as a warning, like Go's shim
        return f"failed to remove container: {exc}"


def delete(flags: Flags) -> tuple[bytes, list[str]]:
    """(the DeleteResponse bytes, warnings for stderr)."""
    bundle = flags.bundle or os.getcwd()
    warnings: list[str] = []
    choice = options.load(bundle)
    if choice is not None:
        warning = _runtime_delete(choice, flags.id)
        if warning:
            warnings.append(warning)
    rootfs = os.path.join(bundle, "rootfs")
    if _mounted(rootfs):
        from berth.core import mount

        try:
            mount.unmount_all(rootfs)
        except OSError as exc:
            warnings.append(f"failed to cleanup rootfs mount: {exc}")
    return wire.delete_response(_read_pid(bundle), EXIT_STATUS), warnings
