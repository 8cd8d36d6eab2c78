"""OCI runtime interface shared by every runtime plugin, spec helpers and the child reaper."""

from berth.core.oci.reaper import Exit, Reaper
from berth.core.oci.runtime import OCIRuntime, State, Stdio

__all__ = ["Exit", "OCIRuntime", "Reaper", "State", "Stdio"]
