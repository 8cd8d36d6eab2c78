"""AppArmor in CRI security contexts, on a node without AppArmor (berth's test kernels have
none: no securityfs ``apparmor`` entry): as containerd 1.6 there, a ``Localhost`` profile
(or the deprecated ``localhost/<name>``) is refused, since the container would run without
the confinement it asked for; ``RuntimeDefault`` and ``Unconfined`` ask for nothing this
node could give and are accepted. Loading profiles on a node that has AppArmor is not
supported yet, and is refused the same way."""

from __future__ import annotations

import betterproto

from berth.core import errdefs
from berth.core.api.runtime import v1 as cri

# The profile type was added over a string field: both are read, as containerd does.
_LOCALHOST_PREFIX = "localhost/"


def check(sc: cri.LinuxContainerSecurityContext | cri.LinuxSandboxSecurityContext) -> None:
    """Unknown (containerd's status for this) when a profile this node cannot apply is
    asked for."""
    prof = sc.apparmor
    if prof is not None and betterproto.serialized_on_wire(prof):
        if prof.profile_type == cri.SecurityProfileProfileType.Localhost:
            raise errdefs.Unknown(
                f"apparmor is not supported: cannot apply profile {prof.localhost_ref!r}",
                raw=True)
        return
    legacy = getattr(sc, "apparmor_profile", "")
    if legacy.startswith(_LOCALHOST_PREFIX):
        raise errdefs.Unknown(
            f"apparmor is not supported: cannot apply profile {legacy!r}", raw=True)
