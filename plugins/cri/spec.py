"""The OCI spec of a CRI container, as containerd's CRI builds it from the pod's and
the container's configs and the image config: command and args over entrypoint and
cmd, env, working dir, user (numeric or by name from the image's /etc/passwd), tty,
privileged, capabilities, masked and read-only paths, read-only rootfs, the pod's pinned
namespaces (the node's for hostNetwork), mounts with propagation, the pod's /etc files,
resources and a clamped OOM score. Pure functions: tested without root.

Seccomp: ``Localhost`` loads the profile file (a JSON object with ``defaultAction``);
``RuntimeDefault`` (also ``runtime/default``, ``docker/default`` and a SecurityProfile
sent empty) is containerd's default profile for the container's capabilities
(:mod:`berth.plugins.cri.seccomp_default`); ``Unconfined`` and an unset profile add
none, as containerd does by default.

A pod-shared PID namespace needs a process to hold it: with sandbox_mode "pause" the
sandbox container's; with pinned namespaces the pod's holder (plugins/cri/pidns), whose
pinned namespace containers join by path.

User namespaces: :mod:`berth.plugins.cri.userns`; CDI devices: :mod:`berth.plugins.cri.cdi`.
AppArmor: :mod:`berth.plugins.cri.apparmor` (Localhost profiles refused). Not supported:
image volumes.
"""

from __future__ import annotations

import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import betterproto

from berth.core import errdefs
from berth.core.api.runtime import v1 as cri
from berth.core.mount import Mount
from berth.core.oci import default_spec as oci
from berth.plugins.cri import apparmor, pins, seccomp_default, userns
from berth.plugins.runtimes.inprocess.caps import NAMES as CAP_NAMES, last_cap

NAMESPACE = "k8s.io"
# Annotations containerd's CRI puts on containers (the shims group a pod by sandbox-id).
ANN_TYPE = "io.kubernetes.cri.container-type"
ANN_SANDBOX_ID = "io.kubernetes.cri.sandbox-id"
ANN_SANDBOX_NAME = "io.kubernetes.cri.sandbox-name"
ANN_SANDBOX_NS = "io.kubernetes.cri.sandbox-namespace"
ANN_SANDBOX_UID = "io.kubernetes.cri.sandbox-uid"
ANN_CONTAINER_NAME = "io.kubernetes.cri.container-name"
ANN_IMAGE_NAME = "io.kubernetes.cri.image-name"
CAP_SYS_RESOURCE = 24


@dataclass(frozen=True)
class PodView:
    """What a container's spec needs of its pod."""

    id: str
    config: cri.PodSandboxConfig
    folder: str
    host_network: bool
    netns: str = ""  # the pinned network namespace of a pod on a CNI network
    # A sandbox container's pid (sandbox_mode "pause"): containers join its namespaces
    # (pid too, for a pod that shares it); 0: the pod's namespaces are berth's pins.
    infra_pid: int = 0
    # The pinned PID namespace of a pod whose holder process keeps it (plugins/cri/pidns).
    pidns: str = ""

    def ns_path(self, kind: str) -> str:
        if self.infra_pid:
            return f"/proc/{self.infra_pid}/ns/{kind}"
        if kind == "pid":
            return self.pidns
        return str(pins.paths(Path(self.folder))[kind]) if kind in pins.KINDS else ""


@dataclass(frozen=True)
class OOMPolicy:
    current: int = 0  # berthd's own oom_score_adj
    restrict: bool = False  # restrict_oom_score_adj
    may_raise: bool = False  # berthd has CAP_SYS_RESOURCE


MAX_PROFILE = 1 << 20


def default_seccomp(bounding: list[str] | None = None) -> dict[str, Any]:
    """RuntimeDefault for a container whose capability bounding set is ``bounding``
    (containerd's default set when None)."""
    caps = oci.default_unix_spec(NAMESPACE, "")["process"]["capabilities"]["bounding"] \
        if bounding is None else bounding
    return seccomp_default.profile(caps)


def load_seccomp(path: str) -> dict[str, Any]:
    """A Localhost profile: an absolute path to a JSON object; InvalidArgument if not."""
    if not path.startswith("/"):
        raise errdefs.InvalidArgument(
            f"seccomp profile {path!r} must be an absolute path", raw=True)
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_PROFILE + 1)
    except OSError as e:
        raise errdefs.InvalidArgument(
            f"failed to load seccomp profile {path!r}: {e.strerror}", raw=True) from None
    if len(data) > MAX_PROFILE:
        raise errdefs.InvalidArgument(f"seccomp profile {path!r} is larger than 1 MiB",
                                      raw=True)
    try:
        doc = json.loads(data)
    except ValueError as e:
        raise errdefs.InvalidArgument(
            f"failed to parse seccomp profile {path!r}: {e}", raw=True) from None
    if not isinstance(doc, dict) or not isinstance(doc.get("defaultAction"), str):
        raise errdefs.InvalidArgument(
            f"seccomp profile {path!r} has no defaultAction", raw=True)
    syscalls = doc.get("syscalls", [])
    if not isinstance(syscalls, list) or not all(isinstance(x, dict) for x in syscalls):
        raise errdefs.InvalidArgument(f"seccomp profile {path!r}: syscalls must be a list "
                                      "of objects", raw=True)
    return doc


def seccomp_for(sc: cri.LinuxContainerSecurityContext | cri.LinuxSandboxSecurityContext,
                bounding: list[str] | None = None, unset: str = "") -> dict[str, Any] | None:
    """The profile a security context asks for (RuntimeDefault for a process whose
    capability bounding set is ``bounding``); when it names none, ``unset`` (the
    ``unset_seccomp_profile`` key, in the deprecated field's syntax); None for none."""
    prof = sc.seccomp
    if prof is not None and betterproto.serialized_on_wire(prof):
        kind = prof.profile_type
        if kind != cri.SecurityProfileProfileType.Localhost and prof.localhost_ref:
            raise errdefs.InvalidArgument(
                "seccomp config invalid: localhost_ref is only for a Localhost profile",
                raw=True)
        if kind == cri.SecurityProfileProfileType.RuntimeDefault:
            return default_seccomp(bounding)
        if kind == cri.SecurityProfileProfileType.Localhost:
            return load_seccomp(prof.localhost_ref)
        return None
    legacy = sc.seccomp_profile_path or unset
    if legacy in ("runtime/default", "docker/default"):
        return default_seccomp(bounding)
    if legacy.startswith("localhost/"):
        return load_seccomp(legacy.removeprefix("localhost"))
    if legacy in ("", "unconfined"):
        return None
    raise errdefs.InvalidArgument(f"unknown seccomp profile {legacy!r}", raw=True)


def device_entry(d: cri.Device) -> tuple[dict[str, Any], dict[str, Any]]:
    """A CRI device as the spec's linux.devices entry and its cgroup allow rule."""
    if not d.host_path.startswith("/") or not d.container_path.startswith("/"):
        raise errdefs.InvalidArgument(
            f"device {d.host_path!r} -> {d.container_path!r}: paths must be absolute",
            raw=True)
    perms = d.permissions or "rwm"
    if set(perms) - set("rwm"):
        raise errdefs.InvalidArgument(f"device permissions {perms!r}: only r, w, m",
                                      raw=True)
    try:
        st = os.stat(d.host_path)
    except OSError as e:
        raise errdefs.InvalidArgument(f"device {d.host_path!r}: {e.strerror}",
                                      raw=True) from None
    if stat.S_ISCHR(st.st_mode):
        kind = "c"
    elif stat.S_ISBLK(st.st_mode):
        kind = "b"
    else:
        raise errdefs.InvalidArgument(f"{d.host_path!r} is not a device", raw=True)
    major, minor = os.major(st.st_rdev), os.minor(st.st_rdev)
    return ({"path": d.container_path, "type": kind, "major": major, "minor": minor,
             "fileMode": stat.S_IMODE(st.st_mode), "uid": st.st_uid, "gid": st.st_gid},
            {"allow": True, "type": kind, "major": major, "minor": minor, "access": perms})


def given(msg: Any, cls: type) -> Any:
    """``msg``, or an empty ``cls`` when absent. Never ``msg or cls()``: a message whose
    fields are all zero is falsy, yet present (seccomp RuntimeDefault, a READY filter)."""
    return msg if msg is not None else cls()


def all_caps() -> list[str]:
    return list(CAP_NAMES[: last_cap() + 1])


def can_raise_oom_priority() -> bool:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) >> CAP_SYS_RESOURCE & 1)
    except OSError:
        pass
    return False


def clamp_oom_score_adj(want: int, current: int, *, restrict: bool, privileged: bool
                        ) -> int:
    """What a container may get: never below berthd's own score when asked to restrict
    (``restrict_oom_score_adj``) or when berthd cannot lower scores at all (no
    CAP_SYS_RESOURCE, as on this machine): the kernel would refuse and the pod fail."""
    want = max(-1000, min(1000, want))
    if (restrict or not privileged) and want < current:
        return current
    return want


def own_oom_score_adj() -> int:
    try:
        return int(Path("/proc/self/oom_score_adj").read_text().strip())
    except (OSError, ValueError):
        return 0


def _layer_dirs(mounts: list[Mount]) -> list[str]:
    """The directories of a snapshot's mounts, topmost first (to read files in it)."""
    out: list[str] = []
    for m in mounts:
        if m.type == "bind":
            out.append(m.source)
        elif m.type == "overlay":
            opts = dict(o.split("=", 1) for o in m.options if "=" in o)
            if "upperdir" in opts:
                out.append(opts["upperdir"])
            out.extend(p for p in opts.get("lowerdir", "").split(":") if p)
    return out


def users_of(mounts: list[Mount]) -> oci.UserDB:
    """The image's users and groups, read from the first layer that has each file."""
    passwd = group = None
    root = ""
    for d in _layer_dirs(mounts):
        if passwd is None:
            p = oci.scoped_path(d, "/etc/passwd")
            if p.is_file():
                passwd, root = oci.parse_passwd(p.read_text(errors="replace")), d
        if group is None:
            g = oci.scoped_path(d, "/etc/group")
            if g.is_file():
                group = oci.parse_group(g.read_text(errors="replace"))
    return oci.UserDB(passwd, group, root)


def check_relative(path: str, what: str) -> None:
    parts = Path(path).parts
    if not path or path.startswith("/") or ".." in parts:
        raise errdefs.InvalidArgument(f"{what} {path!r} must be a relative path inside the "
                                      "pod's log directory", raw=True)


def container_spec(sb: PodView, container_id: str, config: cri.ContainerConfig,
                   image_config: dict[str, Any], image_user: str, mounts: list[Mount],
                   oom: OOMPolicy, target_pidns: str = "", unset_seccomp_profile: str = ""
                   ) -> dict[str, Any]:
    """The OCI spec of a CRI container, as containerd's CRI builds it (the parts berth
    supports; see the module's note on what is left). ``target_pidns``: the PID
    namespace of the container that NamespaceMode.TARGET names (an ephemeral container's
    target), pinned by the caller."""
    users = users_of(mounts)
    spec = oci.default_unix_spec(NAMESPACE, container_id)
    oci.with_default_unix_devices(spec)
    img = image_config.get("config") or {}
    if config.command:
        args = [*config.command, *config.args]
    else:
        args = [*(img.get("Entrypoint") or []), *(config.args or img.get("Cmd") or [])]
    if not args:
        raise errdefs.InvalidArgument("no command specified", raw=True)
    process = spec["process"]
    process["args"] = args
    process["cwd"] = config.working_dir or img.get("WorkingDir") or "/"
    env = list(img.get("Env") or []) or [oci.DEFAULT_PATH_ENV]
    process["env"] = oci.replace_or_append_env(
        env, [f"{kv.key}={kv.value}" for kv in config.envs])
    if config.tty:
        oci.with_tty(spec)
    linux = given(config.linux, cri.LinuxContainerConfig)
    sc = given(linux.security_context, cri.LinuxContainerSecurityContext)
    _user(spec, sc, image_user, users)
    process["noNewPrivileges"] = bool(sc.no_new_privs)
    if sc.privileged:
        if not (sb.config.linux and sb.config.linux.security_context
                and sb.config.linux.security_context.privileged):
            raise errdefs.InvalidArgument(
                "no privileged container allowed in a non-privileged sandbox", raw=True)
        caps = all_caps()
        process["capabilities"] = {"bounding": caps, "effective": list(caps),
                                   "permitted": list(caps)}
        spec["linux"]["maskedPaths"] = []
        spec["linux"]["readonlyPaths"] = []
        for m in spec["mounts"]:
            if m["destination"] == "/sys":
                m["options"] = [o for o in m["options"] if o != "ro"]
    elif sc.capabilities:
        _capabilities(process, sc.capabilities)
    if sc.masked_paths:
        spec["linux"]["maskedPaths"] = list(sc.masked_paths)
    if sc.readonly_paths:
        spec["linux"]["readonlyPaths"] = list(sc.readonly_paths)
    if sc.readonly_rootfs:
        oci.with_rootfs_readonly(spec)
    apparmor.check(sc)
    if not sc.privileged:
        # After the capabilities: RuntimeDefault depends on them.
        profile = seccomp_for(sc, process["capabilities"]["bounding"],
                              unset_seccomp_profile)
        if profile is not None:
            spec["linux"]["seccomp"] = profile
    for d in config.devices:
        entry, rule = device_entry(d)
        spec["linux"].setdefault("devices", []).append(entry)
        spec["linux"].setdefault("resources", {}).setdefault("devices", []).append(rule)
    if sb.config.linux and sb.config.linux.sysctls:
        spec["linux"]["sysctl"] = dict(sb.config.linux.sysctls)
    _namespaces(spec, sb, sc, target_pidns)
    userns.into_spec(spec, userns.mappings(sb.config, sc), sb.folder)
    _mounts(spec, sb, config)
    _resources(spec, sb, container_id, linux.resources, oom)
    annotations = dict(config.annotations)
    m = sb.config.metadata
    annotations.update({
        ANN_TYPE: "container", ANN_SANDBOX_ID: sb.id, ANN_SANDBOX_NAME: m.name,
        ANN_SANDBOX_NS: m.namespace, ANN_SANDBOX_UID: m.uid,
        ANN_CONTAINER_NAME: config.metadata.name, ANN_IMAGE_NAME: config.image.image,
    })
    oci.with_annotations(spec, annotations)
    return spec


def infra_spec(sb: PodView, image_config: dict[str, Any], image_user: str,
               mounts: list[Mount], oom: OOMPolicy) -> dict[str, Any]:
    """A sandbox container (sandbox_mode "pause"): the image's entrypoint in fresh IPC,
    UTS (hostname set) and PID namespaces that the pod's containers then join, on the
    pod's network namespace; as containerd's, unprivileged but for what the pod asks."""
    spec = oci.default_unix_spec(NAMESPACE, sb.id)
    oci.with_default_unix_devices(spec)
    img = image_config.get("config") or {}
    args = [*(img.get("Entrypoint") or []), *(img.get("Cmd") or [])]
    if not args:
        raise errdefs.InvalidArgument("the sandbox image has no command", raw=True)
    process = spec["process"]
    process["args"] = args
    process["cwd"] = img.get("WorkingDir") or "/"
    process["env"] = list(img.get("Env") or []) or [oci.DEFAULT_PATH_ENV]
    lsc = sb.config.linux.security_context if sb.config.linux is not None else None
    lsc = given(lsc, cri.LinuxSandboxSecurityContext)
    opts = given(lsc.namespace_options, cri.NamespaceOption)
    users = users_of(mounts)
    if lsc.run_as_user is not None and betterproto.serialized_on_wire(lsc.run_as_user):
        oci.with_user(spec, str(lsc.run_as_user.value), users)
    elif image_user:
        oci.with_user(spec, image_user, users)
    out = []
    for ns in spec["linux"]["namespaces"]:
        kind = ns["type"]
        if kind == "network":
            if sb.host_network:
                continue
            ns = _network(sb, ns)
        elif kind == "uts" and sb.host_network:
            continue
        elif (kind == "ipc" and opts.ipc == cri.NamespaceMode.NODE) or (
                kind == "pid" and opts.pid == cri.NamespaceMode.NODE):
            continue
        out.append(ns)
    spec["linux"]["namespaces"] = out
    if not sb.host_network and sb.config.hostname:
        spec["hostname"] = sb.config.hostname
    if lsc.readonly_rootfs:
        oci.with_rootfs_readonly(spec)
    if not lsc.privileged and (profile := seccomp_for(
            lsc, process["capabilities"]["bounding"])) is not None:
        spec["linux"]["seccomp"] = profile
    parent = sb.config.linux.cgroup_parent if sb.config.linux else ""
    if parent:
        spec["linux"]["cgroupsPath"] = os.path.normpath(os.path.join(parent, sb.id))
    if sb.config.linux and sb.config.linux.sysctls:
        spec["linux"]["sysctl"] = dict(sb.config.linux.sysctls)
    # containerd's sandbox score, as low as berthd may give.
    process["oomScoreAdj"] = clamp_oom_score_adj(
        -998, oom.current, restrict=oom.restrict, privileged=oom.may_raise)
    m = sb.config.metadata
    oci.with_annotations(spec, {**sb.config.annotations, ANN_TYPE: "sandbox",
                                ANN_SANDBOX_ID: sb.id, ANN_SANDBOX_NAME: m.name,
                                ANN_SANDBOX_NS: m.namespace, ANN_SANDBOX_UID: m.uid})
    return spec


def _user(spec: dict[str, Any], sc: cri.LinuxContainerSecurityContext,
          image_user: str, users: oci.UserDB) -> None:
    has_uid = sc.run_as_user is not None and betterproto.serialized_on_wire(sc.run_as_user)
    has_gid = sc.run_as_group is not None and betterproto.serialized_on_wire(
        sc.run_as_group)
    if has_gid and not (has_uid or sc.run_as_username):
        raise errdefs.InvalidArgument(
            "user group is specified without user or username", raw=True)
    if has_uid:
        user = str(sc.run_as_user.value)
    elif sc.run_as_username:
        user = sc.run_as_username
    else:
        user = image_user
    if has_gid:
        user = f"{user.split(':', 1)[0]}:{sc.run_as_group.value}"
    if user:
        oci.with_user(spec, user, users)
    uid = spec["process"]["user"].get("uid", 0)
    oci.with_additional_gids(spec, str(uid), users)
    if sc.supplemental_groups:
        gids = spec["process"]["user"].setdefault("additionalGids", [])
        gids.extend(g for g in sc.supplemental_groups if g not in gids)


def _capabilities(process: dict[str, Any], caps: cri.Capability) -> None:
    def norm(c: str) -> str:
        c = c.upper()
        return c if c.startswith("CAP_") else "CAP_" + c

    add = [norm(c) for c in caps.add_capabilities]
    drop = {norm(c) for c in caps.drop_capabilities}
    for kind in ("bounding", "effective", "permitted"):
        have = all_caps() if "CAP_ALL" in add else list(process["capabilities"][kind])
        have += [c for c in add if c != "CAP_ALL" and c not in have]
        if "CAP_ALL" in drop:
            have = [c for c in add if c != "CAP_ALL"]
        process["capabilities"][kind] = [c for c in have if c not in drop]


def _network(sb: PodView, ns: dict[str, Any]) -> dict[str, Any]:
    """The pod's network namespace entry (its pinned netns when on a CNI network)."""
    return {"type": "network", "path": sb.netns} if sb.netns else ns


def _namespaces(spec: dict[str, Any], sb: PodView,
                sc: cri.LinuxContainerSecurityContext, target_pidns: str = "") -> None:
    opts = given(sc.namespace_options, cri.NamespaceOption)
    out = []
    for ns in spec["linux"]["namespaces"]:
        kind = ns["type"]
        if kind == "network":
            if sb.host_network:
                continue
            ns = _network(sb, ns)
        elif kind == "uts":
            if sb.host_network:
                continue
            ns = {"type": "uts", "path": sb.ns_path("uts")}
        elif kind == "ipc":
            if opts.ipc == cri.NamespaceMode.NODE:
                continue
            ns = {"type": "ipc", "path": sb.ns_path("ipc")}
        elif kind == "pid":
            if opts.pid == cri.NamespaceMode.NODE:
                continue
            if opts.pid == cri.NamespaceMode.POD and sb.ns_path("pid"):
                ns = {"type": "pid", "path": sb.ns_path("pid")}
            elif opts.pid == cri.NamespaceMode.TARGET:
                if not target_pidns:
                    raise errdefs.InvalidArgument(
                        "PID namespace mode TARGET needs a target container", raw=True)
                ns = {"type": "pid", "path": target_pidns}
        out.append(ns)
    spec["linux"]["namespaces"] = out


def _mounts(spec: dict[str, Any], sb: PodView, config: cri.ContainerConfig) -> None:
    wanted = {m.container_path for m in config.mounts}
    folder = Path(sb.folder)
    extra = []
    for dest, name in (("/etc/hostname", "hostname"), ("/etc/hosts", "hosts"),
                       ("/etc/resolv.conf", "resolv.conf")):
        if dest not in wanted:
            extra.append({"destination": dest, "type": "bind",
                          "source": str(folder / name),
                          "options": ["rbind", "rprivate", "rw"]})
    for m in config.mounts:
        if not m.container_path.startswith("/"):
            raise errdefs.InvalidArgument(
                f"mount destination {m.container_path!r} must be absolute", raw=True)
        if m.image is not None and betterproto.serialized_on_wire(m.image):
            raise errdefs.NotImplemented_("image volume mounts are not supported",
                                          raw=True)
        source = m.host_path
        if not source.startswith("/"):
            raise errdefs.InvalidArgument(
                f"mount source {source!r} must be an absolute host path", raw=True)
        try:
            source = os.path.realpath(source, strict=True)
        except OSError as e:
            raise errdefs.InvalidArgument(
                f"failed to mount {m.host_path!r}: {e.strerror}", raw=True) from None
        propagation = {
            cri.MountPropagation.PROPAGATION_HOST_TO_CONTAINER: "rslave",
            cri.MountPropagation.PROPAGATION_BIDIRECTIONAL: "rshared",
        }.get(m.propagation, "rprivate")
        extra.append({"destination": m.container_path, "type": "bind", "source": source,
                      "options": ["rbind", propagation, "ro" if m.readonly else "rw"]})
    oci.with_mounts(spec, extra)


def linux_resources(res: cri.LinuxContainerResources) -> dict[str, Any]:
    """CRI resources as the runtime spec's linux.resources (cpu, memory, hugepages,
    unified); what is unset stays out."""
    cpu: dict[str, Any] = {}
    for key, value in (("shares", res.cpu_shares), ("quota", res.cpu_quota),
                       ("period", res.cpu_period), ("cpus", res.cpuset_cpus),
                       ("mems", res.cpuset_mems)):
        if value:
            cpu[key] = value
    out: dict[str, Any] = {}
    if cpu:
        out["cpu"] = cpu
    if res.memory_limit_in_bytes:
        out["memory"] = {"limit": res.memory_limit_in_bytes}
        if res.memory_swap_limit_in_bytes:
            out["memory"]["swap"] = res.memory_swap_limit_in_bytes
    if res.hugepage_limits:
        out["hugepageLimits"] = [{"pageSize": h.page_size, "limit": h.limit}
                                 for h in res.hugepage_limits]
    if res.unified:
        out["unified"] = dict(res.unified)
    return out


def _resources(spec: dict[str, Any], sb: PodView, container_id: str,
               res: cri.LinuxContainerResources | None, oom: OOMPolicy) -> None:
    parent = sb.config.linux.cgroup_parent if sb.config.linux else ""
    if parent:
        spec["linux"]["cgroupsPath"] = os.path.normpath(os.path.join(parent, container_id))
    res = given(res, cri.LinuxContainerResources)
    spec["linux"].setdefault("resources", {}).update(linux_resources(res))
    spec["process"]["oomScoreAdj"] = clamp_oom_score_adj(
        res.oom_score_adj, oom.current, restrict=oom.restrict, privileged=oom.may_raise)
