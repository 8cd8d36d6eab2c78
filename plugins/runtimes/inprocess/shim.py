"""What berth's shim calls to run containers with the in-process runtime."""

from __future__ import annotations

import trio

from berth.core.oci.reaper import Reaper
from berth.core.shim.options import RuntimeChoice
from berth.plugins.runtimes.inprocess.runtime import Runtime


def new(choice: RuntimeChoice, bundle: str, reaper: Reaper) -> Runtime:
    return Runtime(choice.root, reaper)


def force_delete(choice: RuntimeChoice, container_id: str) -> str:
    """Delete the container's state from the short-lived ``delete`` action."""

    async def run() -> None:
        reaper = Reaper(subreaper=False)
        async with trio.open_nursery() as nursery:
            await nursery.start(reaper.run)
            await Runtime(choice.root, reaper).delete(container_id, force=True)
            nursery.cancel_scope.cancel()

    try:
        trio.run(run)
    except Exception as exc:  # noqa: BLE001 - reported as a warning, like Go's shim
        return f"failed to remove container: {exc}"
    return ""
