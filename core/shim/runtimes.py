"""The OCI runtimes a shim can run containers with, found through plugin registrations.

An OCI runtime plugin (type ``io.berth.oci-runtime.v1``) registers through the same
``berth_plugins`` hook and ``berth.plugins`` entry-point group as every other plugin; its
``init`` is an :class:`OCIRuntimePlugin`, which names the runtime's entry points as
``"module:callable"`` strings. The shim imports a runtime's module only when a container
uses it (the zygote imports the named modules ahead, so forked shims share them), and the
``delete`` action, a short-lived process, imports only the module the container's runtime
recorded in its bundle, not the plugin machinery.

Which runtime runs a container: the container's runtime options name a binary (runc,
crun...) or none; the first plugin that lists that binary's name serves it, then the first
that lists ``"*"`` (any binary), and a container that names no binary goes to the plugin
that lists ``""``. Plugins from other packages (entry points) are asked before the
built-in ones, so a package can take over a binary name without a change to berth.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from berth.core import errdefs

if TYPE_CHECKING:
    from berth.core.oci.reaper import Reaper
    from berth.core.oci.runtime import OCIRuntime
    from berth.core.plugin.registration import InitContext, Registration
    from berth.core.shim.options import RuntimeChoice

# The built-in runtime plugins, by module name (core finds plugins, it never imports them).
BUILTIN = ("berth.plugins.runtimes.ocicli.plugin", "berth.plugins.runtimes.inprocess.plugin")
ANY_BINARY = "*"
NO_BINARY = ""

NewRuntime = Callable[["RuntimeChoice", str, "Reaper"], "OCIRuntime"]
ForceDelete = Callable[["RuntimeChoice", str], str]


@dataclass(frozen=True)
class OCIRuntimePlugin:
    """What an OCI runtime plugin gives the shim; use it as its registration's ``init``.

    ``new``: ``"module:callable"``, ``(choice, bundle, reaper) -> OCIRuntime``.
    ``delete``: ``"module:callable"``, ``(choice, container_id) -> warning or ""``: force-
    deletes what the runtime left of a container whose shim is gone.
    ``binaries``: the binary names it serves (``"*"`` any, ``""`` no binary).
    ``preload``: modules a warm zygote imports ahead (``new``'s module if empty).
    """

    id: str
    new: str
    delete: str
    binaries: tuple[str, ...]
    preload: tuple[str, ...] = ()

    async def __call__(self, ctx: InitContext) -> OCIRuntimePlugin:
        # In berthd's plugin graph the plugin is listed, and its instance is itself.
        return self

    def registration(self) -> Registration:
        from berth.core.plugin.registration import OCI_RUNTIME, Registration

        return Registration(type=OCI_RUNTIME, id=self.id, init=self)

    def modules(self) -> tuple[str, ...]:
        return self.preload or (self.new.partition(":")[0],)


def resolve(entry: str) -> Any:
    """The object an ``"module:attribute"`` entry names."""
    module, _, attr = entry.partition(":")
    if not module or not attr:
        raise errdefs.InvalidArgument(f"runtime entry {entry!r} is not module:attribute",
                                      raw=True)
    return getattr(importlib.import_module(module), attr)


_registered: list[OCIRuntimePlugin] | None = None


def registered(builtin: tuple[str, ...] = BUILTIN, *, entry_points: bool = True
               ) -> list[OCIRuntimePlugin]:
    """The OCI runtime plugins, other packages' first; found once per process."""
    global _registered
    if _registered is not None and builtin == BUILTIN and entry_points:
        return _registered
    from berth.core.plugin.graph import collect, plugin_manager
    from berth.core.plugin.registration import OCI_RUNTIME

    pm = plugin_manager([], entry_points=entry_points)
    external = [r for r in collect(pm) if r.type == OCI_RUNTIME]
    seen = {r.uri for r in external}
    for name in builtin:
        pm.register(importlib.import_module(name), name=name)
    internal = [r for r in collect(pm) if r.type == OCI_RUNTIME and r.uri not in seen]
    found: list[OCIRuntimePlugin] = []
    for r in external + internal:
        if not isinstance(r.init, OCIRuntimePlugin):
            raise errdefs.FailedPrecondition(
                f"plugin {r.uri}: init must be an OCIRuntimePlugin", raw=True)
        found.append(r.init)
    if builtin == BUILTIN and entry_points:
        _registered = found
    return found


def find(choice: RuntimeChoice, plugins: list[OCIRuntimePlugin] | None = None
         ) -> OCIRuntimePlugin:
    """The plugin that serves a container's runtime choice."""
    plugins = registered() if plugins is None else plugins
    wanted = os.path.basename(choice.binary) if choice.binary else NO_BINARY
    for p in plugins:
        if wanted in p.binaries:
            return p
    if choice.binary:
        for p in plugins:
            if ANY_BINARY in p.binaries:
                return p
    raise errdefs.NotFound(f"no OCI runtime plugin serves {choice.name!r}", raw=True)


def new_runtime(choice: RuntimeChoice, bundle: str, reaper: Reaper) -> OCIRuntime:
    """A container's OCI runtime; records the plugin's delete entry in ``choice``."""
    plugin = find(choice)
    choice.cleanup = plugin.delete
    factory: NewRuntime = resolve(plugin.new)
    return factory(choice, bundle, reaper)


def force_delete(choice: RuntimeChoice, container_id: str) -> str:
    """Force-delete a container through the runtime recorded for it; a warning, or ""."""
    entry = choice.cleanup or find(choice).delete  # bundles from before the record
    delete: ForceDelete = resolve(entry)
    return delete(choice, container_id)
