"""The hooks a berth plugin package implements.

A plugin package is an ordinary Python module that implements ``berth_plugins`` with
``@hookimpl`` and is named in the ``berth.plugins`` entry-point group of its
distribution, e.g. in its pyproject.toml::

    [project.entry-points."berth.plugins"]
    mysnap = "mysnap.plugin"

Built-in plugins register through the very same hook. The typed interfaces a plugin
implements: ``berth.core.snapshots.snapshotter.Snapshotter`` (``io.containerd.snapshotter.v1``),
``berth.core.differ.Differ`` (``io.containerd.differ.v1``), and for berth's shim an OCI
runtime (``io.berth.oci-runtime.v1``, see ``berth.core.shim.runtimes.OCIRuntimePlugin``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from berth.core.plugin.registration import Registration

PROJECT = "berth"
ENTRY_POINT_GROUP = "berth.plugins"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def berth_plugins() -> list[Registration]:
    """Return the plugin registrations this module provides.

    Each registration names a type (``io.containerd.snapshotter.v1``), an id, the types
    it requires and an async ``init(ctx)`` that returns the plugin's instance.
    """
    raise NotImplementedError  # a hookspec is only a signature: pluggy never calls it
