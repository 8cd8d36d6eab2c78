"""berth's in-process OCI runtime: containers set up by a forked child of the shim.

Split like youki: ``spec`` reads config.json into plain data, ``steps`` is the ordered
setup sequence over a ``Syscalls`` object (``syscalls`` is the only module that calls libc),
``mounts``/``devices``/``caps``/``seccomp``/``cgroups``/``hooks`` do one job each, ``state``
persists containers under a root directory and ``runtime`` ties them to the OCIRuntime API.
"""

from berth.plugins.runtimes.inprocess.runtime import Runtime

__all__ = ["Runtime"]
