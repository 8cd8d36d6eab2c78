"""The OCI spec a client builds for a new container, as containerd's client builds it.

containerd's ``oci`` package starts every Linux container from one default spec (the
capabilities, mounts, masked and read-only paths, rlimits and namespaces below, the
cgroup ``/<namespace>/<id>``) and then applies options: the image config (user, env,
working dir, entrypoint + cmd), the command line, a tty, extra env and mounts, a
hostname, an unmanaged rootfs path. The functions here are those options, over a spec
held as a plain dict in the runtime-spec's JSON shape; ``marshal`` writes it with the
fields in the order Go's encoder writes them, and ``to_any`` wraps it as
``ctr``/containerd send it in ``Container.spec``.

User and group names are resolved in the container's root filesystem (its
``/etc/passwd`` and ``/etc/group``), given as a :class:`UserDB`.

This is the client-side default; ``berth.core.oci.spec`` holds the runtime-side helpers
(``runc spec``'s smaller default, bundles, hook state).
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from betterproto.lib.google.protobuf import Any as AnyMsg

from berth.core import errdefs

Spec = dict[str, Any]

#: containerd registers the runtime-spec types under this prefix (typeurl.Register with
#: "types.containerd.io", "opencontainers/runtime-spec", major version 1).
SPEC_TYPE_URL = "types.containerd.io/opencontainers/runtime-spec/1/Spec"
PROCESS_TYPE_URL = "types.containerd.io/opencontainers/runtime-spec/1/Process"

#: specs-go's Version as vendored by containerd 1.6.
OCI_VERSION = "1.0.2-dev"
DEFAULT_ROOTFS_PATH = "rootfs"
DEFAULT_PATH_ENV = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
#: runc refuses ids above MaxInt32, and containerd follows it.
MAX_ID = 2**31 - 1

DEFAULT_CAPABILITIES = (
    "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FSETID", "CAP_FOWNER", "CAP_MKNOD", "CAP_NET_RAW",
    "CAP_SETGID", "CAP_SETUID", "CAP_SETFCAP", "CAP_SETPCAP", "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT", "CAP_KILL", "CAP_AUDIT_WRITE",
)
DEFAULT_NAMESPACES = ("pid", "ipc", "uts", "mount", "network")
DEFAULT_MASKED_PATHS = (
    "/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys", "/proc/latency_stats",
    "/proc/timer_list", "/proc/timer_stats", "/proc/sched_debug", "/sys/firmware",
    "/proc/scsi",
)
DEFAULT_READONLY_PATHS = ("/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys",
                          "/proc/sysrq-trigger")
_TMPFS_OPTIONS = ("nosuid", "strictatime", "mode=755", "size=65536k")
DEFAULT_MOUNTS: tuple[tuple[str, str, str, tuple[str, ...]], ...] = (
    # (destination, type, source, options)
    ("/proc", "proc", "proc", ("nosuid", "noexec", "nodev")),
    ("/dev", "tmpfs", "tmpfs", _TMPFS_OPTIONS),
    ("/dev/pts", "devpts", "devpts",
     ("nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5")),
    ("/dev/shm", "tmpfs", "shm", ("nosuid", "noexec", "nodev", "mode=1777", "size=65536k")),
    ("/dev/mqueue", "mqueue", "mqueue", ("nosuid", "noexec", "nodev")),
    ("/sys", "sysfs", "sysfs", ("nosuid", "noexec", "nodev", "ro")),
    ("/run", "tmpfs", "tmpfs", _TMPFS_OPTIONS),
)
#: WithDefaultUnixDevices: (major, minor) of the character devices every container may
#: use; minor None is "all" (/dev/pts/*).
DEFAULT_DEVICES: tuple[tuple[int, int | None], ...] = (
    (1, 3),  # /dev/null
    (1, 8),  # /dev/random
    (1, 7),  # /dev/full
    (5, 0),  # /dev/tty
    (1, 5),  # /dev/zero
    (1, 9),  # /dev/urandom
    (5, 1),  # /dev/console
    (136, None),  # /dev/pts/*
    (5, 2),  # /dev/ptmx
)


# --- the default --------------------------------------------------------------------

def default_mounts() -> list[dict[str, Any]]:
    return [{"destination": d, "type": t, "source": s, "options": list(o)}
            for d, t, s, o in DEFAULT_MOUNTS]


def default_unix_spec(namespace: str, container_id: str) -> Spec:
    """populateDefaultUnixSpec: the starting point of every Linux container."""
    if not namespace:
        raise errdefs.FailedPrecondition("namespace is required")
    caps = list(DEFAULT_CAPABILITIES)
    return {
        "ociVersion": OCI_VERSION,
        "process": {
            "user": {"uid": 0, "gid": 0},
            "cwd": "/",
            "capabilities": {"bounding": caps, "effective": list(caps),
                             "permitted": list(caps)},
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
            "noNewPrivileges": True,
        },
        "root": {"path": DEFAULT_ROOTFS_PATH},
        "mounts": default_mounts(),
        "linux": {
            "resources": {"devices": [{"allow": False, "access": "rwm"}]},
            "cgroupsPath": cgroup_path(namespace, container_id),
            "namespaces": [{"type": t} for t in DEFAULT_NAMESPACES],
            "maskedPaths": list(DEFAULT_MASKED_PATHS),
            "readonlyPaths": list(DEFAULT_READONLY_PATHS),
        },
    }


def cgroup_path(namespace: str, container_id: str) -> str:
    """``filepath.Join("/", ns, id)``."""
    return os.path.normpath(os.path.join("/", namespace, container_id))


# --- small options --------------------------------------------------------------------

def _process(spec: Spec) -> dict[str, Any]:
    return spec.setdefault("process", {"user": {"uid": 0, "gid": 0}, "cwd": ""})


def _linux(spec: Spec) -> dict[str, Any]:
    return spec.setdefault("linux", {})


def _resources(spec: Spec) -> dict[str, Any]:
    return _linux(spec).setdefault("resources", {})


def with_default_unix_devices(spec: Spec) -> None:
    devices = _resources(spec).setdefault("devices", [])
    for major, minor in DEFAULT_DEVICES:
        rule: dict[str, Any] = {"allow": True, "type": "c", "major": major}
        if minor is not None:
            rule["minor"] = minor
        rule["access"] = "rwm"
        devices.append(rule)


def replace_or_append_env(defaults: Sequence[str], overrides: Sequence[str]) -> list[str]:
    """Overrides replace a default of the same name or are appended; a bare ``NAME``
    (no ``=``) removes the default of that name."""
    results = list(defaults)
    index = {e.split("=", 1)[0]: i for i, e in enumerate(results)}
    removed: set[int] = set()
    for value in overrides:
        if "=" not in value:
            if value in index:
                removed.add(index[value])
            continue
        name = value.split("=", 1)[0]
        if name in index:
            results[index[name]] = value
            removed.discard(index[name])
        else:
            index[name] = len(results)
            results.append(value)
    return [e for i, e in enumerate(results) if i not in removed and e != ""]


def with_env(spec: Spec, env: Sequence[str]) -> None:
    if env:
        p = _process(spec)
        p["env"] = replace_or_append_env(p.get("env") or [], env)


def with_default_path_env(spec: Spec) -> None:
    p = _process(spec)
    p["env"] = replace_or_append_env(p.get("env") or [], [DEFAULT_PATH_ENV])


def with_process_args(spec: Spec, args: Sequence[str]) -> None:
    p = _process(spec)
    p["args"] = list(args)
    p.pop("commandLine", None)


def with_process_cwd(spec: Spec, cwd: str) -> None:
    _process(spec)["cwd"] = cwd


def with_tty(spec: Spec) -> None:
    p = _process(spec)
    p["terminal"] = True
    if "linux" in spec:
        p["env"] = [*(p.get("env") or []), "TERM=xterm"]


def with_tty_size(spec: Spec, width: int, height: int) -> None:
    _process(spec)["consoleSize"] = {"height": height, "width": width}


def with_hostname(spec: Spec, name: str) -> None:
    spec["hostname"] = name


def with_mounts(spec: Spec, mounts: Iterable[Mapping[str, Any]]) -> None:
    spec.setdefault("mounts", []).extend(dict(m) for m in mounts)


def with_host_namespace(spec: Spec, ns_type: str) -> None:
    """Leave one of the default namespaces: the task shares the host's."""
    namespaces = _linux(spec).get("namespaces") or []
    for i, ns in enumerate(namespaces):
        if ns.get("type") == ns_type:
            del namespaces[i]
            return


def with_host_file(spec: Spec, path: str) -> None:
    """WithHostHostsFile / WithHostResolvconf: the host's file, bound read-only."""
    with_mounts(spec, [{"destination": path, "type": "bind", "source": path,
                        "options": ["rbind", "ro"]}])


def with_rootfs_path(spec: Spec, path: str) -> None:
    spec.setdefault("root", {})["path"] = path


def with_rootfs_readonly(spec: Spec) -> None:
    spec.setdefault("root", {"path": ""})["readonly"] = True


def with_cgroup(spec: Spec, path: str) -> None:
    _linux(spec)["cgroupsPath"] = path


def with_namespaced_cgroup(spec: Spec, namespace: str, container_id: str) -> None:
    if not namespace:
        raise errdefs.FailedPrecondition("namespace is required")
    with_cgroup(spec, cgroup_path(namespace, container_id))


def with_cpu_shares(spec: Spec, shares: int) -> None:
    _resources(spec).setdefault("cpu", {})["shares"] = shares


def with_annotations(spec: Spec, annotations: Mapping[str, str]) -> None:
    spec.setdefault("annotations", {}).update(annotations)


# --- users and groups -----------------------------------------------------------------

@dataclass(frozen=True)
class User:
    name: str
    uid: int
    gid: int


@dataclass(frozen=True)
class Group:
    name: str
    gid: int
    members: tuple[str, ...] = ()


def _int(text: str) -> int:
    # runc's parser leaves a field it cannot read as a number at zero.
    try:
        return int(text)
    except ValueError:
        return 0


def parse_passwd(text: str) -> list[User]:
    out = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line:
            continue
        parts = line.split(":") + [""] * 4
        out.append(User(parts[0], _int(parts[2]), _int(parts[3])))
    return out


def parse_group(text: str) -> list[Group]:
    out = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split(":") + [""] * 4
        members = tuple(m for m in parts[3].split(",") if m) if parts[3] else ()
        out.append(Group(parts[0], _int(parts[2]), members))
    return out


def scoped_path(root: str | os.PathLike[str], path: str) -> Path:
    """``path`` inside ``root`` with symlinks resolved as if ``root`` were ``/``
    (continuity's fs.RootPath): a link can never lead out of the root."""
    base = Path(root)
    todo = [p for p in path.split("/") if p]
    done: list[str] = []
    hops = 0
    while todo:
        part = todo.pop(0)
        if part == ".":
            continue
        if part == "..":
            if done:
                done.pop()
            continue
        candidate = base.joinpath(*done, part)
        if candidate.is_symlink():
            hops += 1
            if hops > 255:
                raise errdefs.InvalidArgument(f"too many links resolving {path}")
            target = os.readlink(candidate)
            if target.startswith("/"):
                done = []
            todo = [p for p in target.split("/") if p] + todo
            continue
        done.append(part)
    return base.joinpath(*done)


@dataclass
class UserDB:
    """The users and groups of a root filesystem; ``None`` marks a missing file."""

    users: list[User] | None = None
    groups: list[Group] | None = None
    rootfs: str = ""

    @classmethod
    def from_root(cls, root: str | os.PathLike[str]) -> UserDB:
        def read(name: str) -> str | None:
            try:
                return scoped_path(root, name).read_text(errors="replace")
            except (FileNotFoundError, NotADirectoryError):
                return None

        passwd, group = read("/etc/passwd"), read("/etc/group")
        return cls(None if passwd is None else parse_passwd(passwd),
                   None if group is None else parse_group(group), os.fspath(root))

    def user(self, *, name: str | None = None, uid: int | None = None) -> User | None:
        for u in self.users or []:
            if (name is not None and u.name == name) or (uid is not None and u.uid == uid):
                return u
        return None

    def group(self, name: str) -> Group | None:
        for g in self.groups or []:
            if g.name == name:
                return g
        return None


def _user(spec: Spec) -> dict[str, Any]:
    return _process(spec).setdefault("user", {"uid": 0, "gid": 0})


def _ensure_additional_gids(spec: Spec) -> None:
    """The primary group is always among the additional ones (containerd #5940)."""
    u = _user(spec)
    gids = u.get("additionalGids") or []
    if u["gid"] not in gids:
        u["additionalGids"] = [u["gid"], *gids]


def _small_id(text: str) -> int | None:
    try:
        v = int(text)
    except ValueError:
        return None
    return v if 0 <= v <= MAX_ID else None


def with_user_id(spec: Spec, uid: int, users: UserDB) -> None:
    """The uid, and the gid of its passwd entry (0 when there is none)."""
    u = _user(spec)
    u.pop("additionalGids", None)
    found = users.user(uid=uid)
    u["uid"], u["gid"] = (found.uid, found.gid) if found else (uid, 0)
    _ensure_additional_gids(spec)


def with_username(spec: Spec, name: str, users: UserDB) -> None:
    u = _user(spec)
    u.pop("additionalGids", None)
    if users.users is None:
        raise errdefs.NotFound(f"open {users.rootfs}/etc/passwd: no such file or directory",
                               raw=True)
    found = users.user(name=name)
    if found is None:
        raise errdefs.NotFound("no users found", raw=True)
    u["uid"], u["gid"] = found.uid, found.gid
    _ensure_additional_gids(spec)


def with_user(spec: Spec, userstr: str, users: UserDB) -> None:
    """WithUser: ``user``, ``uid``, ``user:group``, ``uid:gid``, ``uid:group``,
    ``user:gid``, names looked up in the rootfs."""
    u = _user(spec)
    u.pop("additionalGids", None)
    parts = userstr.split(":")
    if len(parts) == 1:
        uid = _small_id(parts[0])
        if uid is None:
            with_username(spec, parts[0], users)
        else:
            with_user_id(spec, uid, users)
        return
    if len(parts) != 2:
        raise errdefs.InvalidArgument(f"invalid USER value {userstr}", raw=True)
    uid, gid = _small_id(parts[0]), _small_id(parts[1])
    username = parts[0] if uid is None else ""
    groupname = parts[1] if gid is None else ""
    if username:
        if users.users is None:
            raise errdefs.NotFound(
                f"open {users.rootfs}/etc/passwd: no such file or directory", raw=True)
        found = users.user(name=username)
        if found is None:
            raise errdefs.NotFound("no users found", raw=True)
        uid = found.uid
    if groupname:
        if users.groups is None:
            raise errdefs.NotFound(
                f"open {users.rootfs}/etc/group: no such file or directory", raw=True)
        g = users.group(groupname)
        if g is None:
            raise errdefs.NotFound("no groups found", raw=True)
        gid = g.gid
    u["uid"], u["gid"] = uid or 0, gid or 0
    _ensure_additional_gids(spec)


def with_additional_gids(spec: Spec, userstr: str, users: UserDB) -> None:
    """The groups of /etc/group listing the user (by name or uid) as a member."""
    u = _user(spec)
    u.pop("additionalGids", None)
    try:
        uid = _small_id(userstr) if userstr.isdigit() else None
        if uid is not None:
            found = users.user(uid=uid)
            if found is None:
                return
            username = found.name
        else:
            username = userstr
        if users.groups is None:
            return
        gids = [g.gid for g in users.groups if g.name != username and username in g.members]
        if gids:
            u["additionalGids"] = gids
    finally:
        _ensure_additional_gids(spec)


# --- the image config -----------------------------------------------------------------

def with_image_config(spec: Spec, image_config: Mapping[str, Any], users: UserDB,
                      args: Sequence[str] | None = None) -> None:
    """WithImageConfigArgs for Linux: env (the image's, or the default PATH, overridden
    by what the spec has), entrypoint + cmd (or ``args``), working dir and user.

    ``image_config`` is the whole image config document (``{"config": {...}, ...}``).
    """
    config = image_config.get("config") or {}
    p = _process(spec)
    defaults = list(config.get("Env") or []) or [DEFAULT_PATH_ENV]
    p["env"] = replace_or_append_env(defaults, p.get("env") or [])
    cmd = list(args) if args else list(config.get("Cmd") or [])
    p["args"] = [*(config.get("Entrypoint") or []), *cmd]
    p["cwd"] = config.get("WorkingDir") or "/"
    user = config.get("User") or ""
    if user:
        with_user(spec, user, users)
        with_additional_gids(spec, str(_user(spec)["uid"]), users)
    else:
        # The image's /etc/group may add groups to root as well.
        with_additional_gids(spec, "root", users)


def image_labels(image_config: Mapping[str, Any]) -> dict[str, str]:
    return dict((image_config.get("config") or {}).get("Labels") or {})


def image_stop_signal(image_config: Mapping[str, Any], default: str = "SIGTERM") -> str:
    return (image_config.get("config") or {}).get("StopSignal") or default


# --- mount flags ----------------------------------------------------------------------

def parse_mount_flag(text: str) -> dict[str, Any]:
    """ctr's ``--mount type=bind,src=/a,dst=/b,options=rbind:ro`` (a CSV record)."""
    fields = next(csv.reader([text]), [])
    mount: dict[str, Any] = {}
    for f in fields:
        key, sep, val = f.partition("=")
        if not sep:
            raise errdefs.InvalidArgument(
                "invalid mount specification: expected key=val", raw=True)
        if key == "type":
            mount["type"] = val
        elif key in ("source", "src"):
            mount["source"] = val
        elif key in ("destination", "dst"):
            mount["destination"] = val
        elif key == "options":
            mount["options"] = val.split(":")
        else:
            raise errdefs.InvalidArgument(f"mount option {key!r} not supported", raw=True)
    return {k: mount[k] for k in ("destination", "type", "source", "options") if k in mount}


# --- encoding -------------------------------------------------------------------------

# Go's encoder writes struct fields in declaration order and leaves empty optional ones
# out; the key orders of specs-go's structs, for the parts a client writes.
_ORDER: dict[str, tuple[str, ...]] = {
    "spec": ("ociVersion", "process", "root", "hostname", "mounts", "hooks", "annotations",
             "linux", "solaris", "windows", "vm"),
    "process": ("terminal", "consoleSize", "user", "args", "commandLine", "env", "cwd",
                "capabilities", "rlimits", "noNewPrivileges", "apparmorProfile",
                "oomScoreAdj", "selinuxLabel"),
    "user": ("uid", "gid", "umask", "additionalGids", "username"),
    "capabilities": ("bounding", "effective", "inheritable", "permitted", "ambient"),
    "linux": ("uidMappings", "gidMappings", "sysctl", "resources", "cgroupsPath",
              "namespaces", "devices", "seccomp", "rootfsPropagation", "maskedPaths",
              "readonlyPaths", "mountLabel", "intelRdt", "personality"),
    "resources": ("devices", "memory", "cpu", "pids", "blockIO", "hugepageLimits",
                  "network", "rdma", "unified"),
    "mount": ("destination", "type", "source", "options"),
}
_NESTED = {("spec", "process"): "process", ("process", "user"): "user",
           ("process", "capabilities"): "capabilities", ("spec", "linux"): "linux",
           ("linux", "resources"): "resources"}
# Fields Go writes even when empty (no omitempty); every other empty one is left out.
_ALWAYS = {("user", "uid"), ("user", "gid"), ("process", "cwd"), ("spec", "ociVersion"),
           ("mount", "destination")}


def _empty(v: Any) -> bool:
    return v is None or v is False or (isinstance(v, str | list | dict) and not v)


def _ordered(kind: str, obj: Mapping[str, Any]) -> dict[str, Any]:
    order = _ORDER[kind]
    keys = [k for k in order if k in obj] + sorted(k for k in obj if k not in order)
    out: dict[str, Any] = {}
    for k in keys:
        v = obj[k]
        if _empty(v) and (kind, k) not in _ALWAYS:
            continue
        sub = _NESTED.get((kind, k))
        if sub and isinstance(v, Mapping):
            v = _ordered(sub, v)
        elif kind == "spec" and k == "mounts":
            v = [_ordered("mount", m) for m in v]
        out[k] = v
    return out


def marshal(spec: Spec) -> bytes:
    """Compact JSON, keys in specs-go order, empty optional fields left out."""
    return json.dumps(_ordered("spec", spec), separators=(",", ":")).encode()


def marshal_process(process: Mapping[str, Any]) -> bytes:
    return json.dumps(_ordered("process", process), separators=(",", ":")).encode()


def to_any(spec: Spec) -> AnyMsg:
    return AnyMsg(type_url=SPEC_TYPE_URL, value=marshal(spec))


def process_any(process: Mapping[str, Any]) -> AnyMsg:
    return AnyMsg(type_url=PROCESS_TYPE_URL, value=marshal_process(process))


def from_any(msg: AnyMsg | None) -> Spec:
    """A container's spec back from its Any (JSON, as typeurl stores non-proto types)."""
    if msg is None or not msg.value:
        return {}
    try:
        doc = json.loads(msg.value)
    except ValueError as e:
        raise errdefs.InvalidArgument(f"invalid OCI spec: {e}", raw=True) from None
    if not isinstance(doc, dict):
        raise errdefs.InvalidArgument("invalid OCI spec: not an object", raw=True)
    return doc


@dataclass
class Options:
    """What a command line asks of a new container's spec (ctr's run/create flags)."""

    args: list[str] = field(default_factory=list)
    env: list[str] = field(default_factory=list)
    mounts: list[dict[str, Any]] = field(default_factory=list)
    cwd: str = ""
    user: str = ""
    tty: bool = False
    tty_size: tuple[int, int] | None = None  # (width, height) of the local terminal
    net_host: bool = False
    host_hostname: str = ""
    hostname: str = ""
    read_only: bool = False
    cpu_shares: int = 0
    cgroup: str | None = None
    annotations: dict[str, str] = field(default_factory=dict)
    rootfs: str = ""  # an unmanaged root filesystem (--rootfs); "" for an image's


def build(namespace: str, container_id: str, opts: Options, users: UserDB,
          image_config: Mapping[str, Any] | None = None) -> Spec:
    """The spec ``ctr run``/``ctr containers create`` build, in ctr's order of options.

    With ``opts.rootfs`` and no image, the process also gets the default PATH (ctr
    leaves env empty there, and runc then cannot find a bare command name).
    """
    spec = default_unix_spec(namespace, container_id)
    with_default_unix_devices(spec)
    with_env(spec, opts.env)
    with_mounts(spec, opts.mounts)
    if opts.rootfs:
        with_rootfs_path(spec, opts.rootfs)
        p = _process(spec)
        p["env"] = replace_or_append_env([DEFAULT_PATH_ENV], p.get("env") or [])
    elif image_config is not None:
        with_image_config(spec, image_config, users)
    if opts.read_only:
        with_rootfs_readonly(spec)
    if opts.args:
        with_process_args(spec, opts.args)
    if opts.cwd:
        with_process_cwd(spec, opts.cwd)
    if opts.user:
        with_user(spec, opts.user, users)
    if opts.tty:
        with_tty(spec)
        if opts.tty_size:
            with_tty_size(spec, *opts.tty_size)
    if opts.hostname:
        with_hostname(spec, opts.hostname)
    if opts.net_host:
        with_host_namespace(spec, "network")
        with_host_file(spec, "/etc/hosts")
        with_host_file(spec, "/etc/resolv.conf")
        if opts.host_hostname:
            with_env(spec, [f"HOSTNAME={opts.host_hostname}"])
    if opts.cpu_shares > 0:
        with_cpu_shares(spec, opts.cpu_shares)
    if opts.cgroup is not None:
        with_cgroup(spec, opts.cgroup)
    with_annotations(spec, opts.annotations)
    return spec
