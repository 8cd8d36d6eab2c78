"""berth's client library: asyncio on grpclib, as containerd keeps its ``client/`` apart
from ``cmd/ctr`` and from its services.

The rule a reader can rely on: a file's path tells its concurrency model.

- ``core/client/`` and ``core/cli/`` run under **asyncio** (grpclib's channel): the
  connection (:mod:`.connection`), content, images, snapshots, diff and leases as a client
  sees them (:mod:`.client`), image work (:mod:`.images`), the registry client
  (:mod:`.registry`), container stdio (:mod:`.cio`) and task helpers (:mod:`.tasks`).
  ``core/cli`` is a thin command layer over this package.
- Everything else under ``core/`` is berthd's side and runs under **trio**, except the
  shared vocabulary that has no concurrency at all (``core/images``: media types,
  manifests, platforms, references; ``core/archive``: layer compression and tar;
  ``core/errdefs``, ``core/api``), which both sides import.

berthd never imports this package (tests/unit/test_client_layering.py checks it), and
nothing here imports a plugin. From the rest of core it uses the shared vocabulary and a
few blocking helpers with no event loop (``core.mount``, ``core.oci.default_spec``).
"""
