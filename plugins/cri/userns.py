"""Pod user namespaces (CRI ``NamespaceOption.userns_options``).

Mode NODE (or no options) keeps the host's user namespace. Mode POD runs the pod's
containers in one user namespace with the pod's uid and gid mappings: made on the pod's
first container (``unshare(1)`` makes it, berth writes the mappings and pins it by a bind
mount in the pod's folder, as the other pod namespaces), joined by path in the OCI spec,
whose ``uidMappings``/``gidMappings`` say what it maps. A container asking for other
options than its pod's is refused; modes CONTAINER and TARGET too, as the kubelet never
asks for them.

The image's files belong to host ids 0..n, which a mapped container sees as the overflow
id (nobody): its root could not write its own root filesystem. The container's snapshot
is therefore chowned into the mapped range when it is made, as containerd does for a
snapshotter without id-mapped mounts (the overlay copies up what it chowns: the cost is
a copy of the image's files per container). Neither runc 1.1 nor berth's runtimes take
id-mapped rootfs mounts, which would avoid the copy.

The pod's pinned network, IPC and UTS namespaces stay owned by the host's user
namespace (they are made before any container), so a
container's root has no capability over them (no sysctls of its own in them), and may
not mount their sysfs or mqueue: /sys is then the host's, bound read-only, and
/dev/mqueue is left out.
"""

from __future__ import annotations

import os
import stat
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import betterproto

from berth.core import errdefs, nspin
from berth.core.api.runtime import v1 as cri
from berth.core.mount import Mount, mount, mounted
from berth.plugins.cri.config import BERTH_RUNTIME, Runtime

MAX_ID = 1 << 32
MAX_MAPPINGS = 340  # the kernel's limit of lines in uid_map (since 4.15)


def _bad(msg: str) -> errdefs.InvalidArgument:
    return errdefs.InvalidArgument(msg, raw=True)


def _options(ns: cri.NamespaceOption | None) -> cri.UserNamespace | None:
    if ns is None or ns.userns_options is None:
        return None
    u = ns.userns_options
    return u if betterproto.serialized_on_wire(u) else None


def _maps(items: list[cri.IdMapping], what: str) -> list[dict[str, int]]:
    if not items:
        raise _bad(f"user namespace mode POD needs {what} mappings")
    if len(items) > MAX_MAPPINGS:
        raise _bad(f"user namespace: more than {MAX_MAPPINGS} {what} mappings")
    out, spans = [], []
    for m in items:
        if m.length == 0:
            raise _bad(f"user namespace: a {what} mapping of length 0")
        if m.host_id + m.length > MAX_ID or m.container_id + m.length > MAX_ID:
            raise _bad(f"user namespace: {what} mapping {m.container_id}:{m.host_id}:"
                       f"{m.length} leaves the 32-bit id range")
        spans.append((m.container_id, m.container_id + m.length))
        out.append({"containerID": m.container_id, "hostID": m.host_id, "size": m.length})
    spans.sort()
    if any(a[1] > b[0] for a, b in zip(spans, spans[1:], strict=False)):
        raise _bad(f"user namespace: {what} mappings overlap")
    return out


def mappings(pod: cri.PodSandboxConfig, sc: cri.LinuxContainerSecurityContext | None
             ) -> tuple[list[dict[str, int]], list[dict[str, int]]] | None:
    """The (uid, gid) mappings a container runs with; None for the host's namespace."""
    # `is not None` throughout: a message whose fields are all defaults is falsy.
    lsc = pod.linux.security_context if pod.linux is not None else None
    pod_opts = _options(lsc.namespace_options if lsc is not None else None)
    own = _options(sc.namespace_options if sc is not None else None)
    if own is not None and pod_opts is not None and bytes(own) != bytes(pod_opts):
        raise _bad("the container's user namespace options differ from its pod's")
    u = own if own is not None else pod_opts
    if u is None or u.mode == cri.NamespaceMode.NODE:
        return None
    if pod_opts is None or pod_opts.mode != cri.NamespaceMode.POD:
        raise _bad("a container may only use its pod's user namespace, and the pod has none")
    if u.mode != cri.NamespaceMode.POD:
        raise _bad(f"user namespace mode {cri.NamespaceMode(u.mode).name} is not supported "
                   "(POD or NODE)")
    return _maps(u.uids, "uid"), _maps(u.gids, "gid")


def supported(runtime: Runtime) -> bool:
    """Whether a handler runs pods in user namespaces (Status tells the kubelet)."""
    return runtime.runtime_type == BERTH_RUNTIME and not runtime.options.get("BinaryName")


def for_container(pod: cri.PodSandboxConfig,
                  sc: cri.LinuxContainerSecurityContext | None, runtime: Runtime
                  ) -> tuple[list[dict[str, int]], list[dict[str, int]]] | None:
    """:func:`mappings`, refused (Unimplemented) on a runtime that cannot run them: runc
    1.1 (and so the runc-v2 shim, or berth's shim with an external binary) joins the
    user namespace before the pod's others on exec, which then refuses every ExecSync."""
    maps = mappings(pod, sc)
    if maps is not None and not supported(runtime):
        raise errdefs.NotImplemented_(
            f"user namespaces (userns_options mode POD) need a runtime handler on berth's "
            f"in-process runtime; {runtime.name!r} runs runc, whose exec cannot join a pod "
            "namespace its user namespace does not own", raw=True)
    return maps


PIN = "userns"
_PIN_WAIT = 10.0  # bounds a failure of unshare(1); nothing is timed


def pin_path(folder: str | Path) -> Path:
    return Path(folder) / PIN


def pod_userns(folder: Path,
               maps: tuple[list[dict[str, int]], list[dict[str, int]]]) -> Path:
    """The pod's user namespace, made with ``maps`` and pinned on first use; blocking.
    A process of its own makes it: unshare(2) refuses CLONE_NEWUSER to a threaded one."""
    path = pin_path(folder)
    if nspin.is_pinned(path, "user"):
        return path
    if not path.exists():  # a start cut short by a crash leaves its placeholder
        nspin.placeholder(path)
    try:
        child = subprocess.Popen(["unshare", "--user", "--", "sleep", "60"],
                                 stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.PIPE)
    except OSError as e:
        raise errdefs.FailedPrecondition(
            f"user namespace for the pod: unshare(1) (util-linux) is needed: {e}",
            raw=True) from None
    try:
        own = os.stat("/proc/self/ns/user").st_ino
        deadline = time.monotonic() + _PIN_WAIT
        while os.stat(f"/proc/{child.pid}/ns/user").st_ino == own:
            if child.poll() is not None or time.monotonic() > deadline:
                err = child.stderr.read().decode(errors="replace") if child.stderr else ""
                raise errdefs.Internal(f"user namespace for the pod: unshare failed: {err}",
                                       raw=True)
            time.sleep(0.002)
        for name, ms in (("uid_map", maps[0]), ("gid_map", maps[1])):
            with open(f"/proc/{child.pid}/{name}", "w") as f:
                f.write("".join(f"{m['containerID']} {m['hostID']} {m['size']}\n"
                                for m in ms))
        mount(Mount("bind", f"/proc/{child.pid}/ns/user", ["bind"]), path)
    except OSError as e:
        raise errdefs.Internal(f"user namespace for the pod: {e}", raw=True) from None
    finally:
        child.kill()
        child.wait()
        if child.stderr:
            child.stderr.close()
    return path


def unpin(folder: str | Path) -> None:
    nspin.unpin(pin_path(folder))


def into_spec(spec: dict[str, Any],
              maps: tuple[list[dict[str, int]], list[dict[str, int]]] | None,
              folder: str) -> None:
    """The pod's user namespace (pinned in ``folder``) and its mappings, in the OCI spec."""
    if maps is None:
        return
    linux = spec["linux"]
    if any(ns["type"] == "pid" and ns.get("path") for ns in linux["namespaces"]):
        # /proc may only be mounted by the user namespace owning the PID namespace, and
        # a pod's shared one is the host user namespace's.
        raise errdefs.NotImplemented_(
            "a user namespace with the pod's shared PID namespace is not supported",
            raw=True)
    linux["namespaces"] = [ns for ns in linux["namespaces"] if ns["type"] != "user"]
    linux["namespaces"].append({"type": "user", "path": str(pin_path(folder))})
    linux["uidMappings"], linux["gidMappings"] = maps
    new = {ns["type"] for ns in linux["namespaces"] if not ns.get("path")}
    mounts = []
    for m in spec["mounts"]:
        if m["type"] == "sysfs" and "network" not in new:
            # sysfs may only be mounted by the user namespace owning the network
            # namespace: the host's /sys, bound read-only (as rootless runtimes do).
            m = {"destination": m["destination"], "type": "bind", "source": "/sys",
                 "options": ["rbind", "nosuid", "noexec", "nodev", "ro"]}
        elif m["type"] == "mqueue" and "ipc" not in new:
            # Likewise for an IPC namespace's mqueue; mq_open(3) works without it.
            continue
        mounts.append(m)
    spec["mounts"] = mounts


def _mapper(maps: Sequence[dict[str, int]]) -> Any:
    def to_host(i: int) -> int:
        for m in maps:
            if m["containerID"] <= i < m["containerID"] + m["size"]:
                return m["hostID"] + i - m["containerID"]
        return i  # outside every mapping: left as is (the overflow id inside)
    return to_host


def remap_rootfs(mounts: list[Mount],
                 maps: tuple[list[dict[str, int]], list[dict[str, int]]]) -> int:
    """Chown a container's snapshot into the mapped range; returns the entries changed.
    Set-id bits, which chown clears, are put back."""
    uid, gid = _mapper(maps[0]), _mapper(maps[1])
    changed = 0
    # A hard link already mapped through another name must not be mapped twice (host and
    # container ranges may overlap); one that copy-up split from it still needs mapping.
    done: dict[tuple[int, int], tuple[int, int]] = {}
    with mounted(mounts) as root:
        for top, dirs, files in os.walk(root):
            for name in [*dirs, *files] if top != str(root) else [".", *dirs, *files]:
                path = os.path.join(top, name)
                st = os.lstat(path)
                if done.get((st.st_dev, st.st_ino)) == (st.st_uid, st.st_gid):
                    continue
                want = (uid(st.st_uid), gid(st.st_gid))
                if want == (st.st_uid, st.st_gid):
                    continue
                os.lchown(path, *want)
                if not stat.S_ISLNK(st.st_mode) and st.st_mode & (stat.S_ISUID | stat.S_ISGID):
                    os.chmod(path, stat.S_IMODE(st.st_mode))
                after = os.lstat(path)
                done[(after.st_dev, after.st_ino)] = want
                changed += 1
    return changed
