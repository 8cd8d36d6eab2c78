"""Reading and validating an OCI config.json into plain data the set-up steps use.

All parsing and validation happens in the runtime (before any fork) so that a bad spec is
an ``InvalidArgument`` from ``create``, never a half-made container.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from berth.core import errdefs
from berth.plugins.runtimes.inprocess import caps, syscalls as sys_

NAMESPACE_FLAGS = {
    "user": sys_.CLONE_NEWUSER,
    "pid": sys_.CLONE_NEWPID,
    "network": sys_.CLONE_NEWNET,
    "ipc": sys_.CLONE_NEWIPC,
    "uts": sys_.CLONE_NEWUTS,
    "mount": sys_.CLONE_NEWNS,
    "cgroup": sys_.CLONE_NEWCGROUP,
    "time": sys_.CLONE_NEWTIME,
}
#: /proc/<pid>/ns/<name> for each OCI namespace type
NAMESPACE_FILES = {"user": "user", "pid": "pid", "network": "net", "ipc": "ipc",
                   "uts": "uts", "mount": "mnt", "cgroup": "cgroup", "time": "time"}

RLIMITS = {
    "RLIMIT_CPU": 0, "RLIMIT_FSIZE": 1, "RLIMIT_DATA": 2, "RLIMIT_STACK": 3,
    "RLIMIT_CORE": 4, "RLIMIT_RSS": 5, "RLIMIT_NPROC": 6, "RLIMIT_NOFILE": 7,
    "RLIMIT_MEMLOCK": 8, "RLIMIT_AS": 9, "RLIMIT_LOCKS": 10, "RLIMIT_SIGPENDING": 11,
    "RLIMIT_MSGQUEUE": 12, "RLIMIT_NICE": 13, "RLIMIT_RTPRIO": 14, "RLIMIT_RTTIME": 15,
}

# option -> (flags to set, flags to clear)
_FLAG_OPTIONS: dict[str, tuple[int, int]] = {
    "ro": (sys_.MS_RDONLY, 0), "rw": (0, sys_.MS_RDONLY),
    "nosuid": (sys_.MS_NOSUID, 0), "suid": (0, sys_.MS_NOSUID),
    "nodev": (sys_.MS_NODEV, 0), "dev": (0, sys_.MS_NODEV),
    "noexec": (sys_.MS_NOEXEC, 0), "exec": (0, sys_.MS_NOEXEC),
    "sync": (sys_.MS_SYNCHRONOUS, 0), "async": (0, sys_.MS_SYNCHRONOUS),
    "dirsync": (sys_.MS_DIRSYNC, 0),
    "remount": (sys_.MS_REMOUNT, 0),
    "mand": (sys_.MS_MANDLOCK, 0), "nomand": (0, sys_.MS_MANDLOCK),
    "atime": (0, sys_.MS_NOATIME), "noatime": (sys_.MS_NOATIME, 0),
    "diratime": (0, sys_.MS_NODIRATIME), "nodiratime": (sys_.MS_NODIRATIME, 0),
    "relatime": (sys_.MS_RELATIME, 0), "norelatime": (0, sys_.MS_RELATIME),
    "strictatime": (sys_.MS_STRICTATIME, 0), "nostrictatime": (0, sys_.MS_STRICTATIME),
    "lazytime": (sys_.MS_LAZYTIME, 0), "nolazytime": (0, sys_.MS_LAZYTIME),
    "nosymfollow": (sys_.MS_NOSYMFOLLOW, 0), "symfollow": (0, sys_.MS_NOSYMFOLLOW),
    "silent": (sys_.MS_SILENT, 0), "loud": (0, sys_.MS_SILENT),
    "bind": (sys_.MS_BIND, 0), "rbind": (sys_.MS_BIND | sys_.MS_REC, 0),
}
PROPAGATION = {
    "private": sys_.MS_PRIVATE, "rprivate": sys_.MS_PRIVATE | sys_.MS_REC,
    "shared": sys_.MS_SHARED, "rshared": sys_.MS_SHARED | sys_.MS_REC,
    "slave": sys_.MS_SLAVE, "rslave": sys_.MS_SLAVE | sys_.MS_REC,
    "unbindable": sys_.MS_UNBINDABLE, "runbindable": sys_.MS_UNBINDABLE | sys_.MS_REC,
}
_EXTENSIONS = {"tmpcopyup"}

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


@dataclass
class Mount:
    destination: str
    type: str
    source: str
    flags: int = 0
    propagation: list[int] = field(default_factory=list)
    data: str = ""
    extensions: set[str] = field(default_factory=set)

    @property
    def bind(self) -> bool:
        return bool(self.flags & sys_.MS_BIND)


@dataclass
class Device:
    path: str
    type: str  # c, b, u (= c) or p
    major: int
    minor: int
    file_mode: int = 0o666
    uid: int = 0
    gid: int = 0


@dataclass
class Namespace:
    type: str
    path: str | None = None


@dataclass
class IdMap:
    container: int
    host: int
    size: int


@dataclass
class Process:
    args: list[str]
    env: list[str] = field(default_factory=list)
    cwd: str = "/"
    terminal: bool = False
    uid: int = 0
    gid: int = 0
    additional_gids: list[int] = field(default_factory=list)
    umask: int | None = None
    caps: caps.CapSets = field(default_factory=caps.CapSets)
    rlimits: list[tuple[int, int, int]] = field(default_factory=list)
    no_new_privileges: bool = False
    oom_score_adj: int | None = None

    def environ(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for entry in self.env:
            key, sep, value = entry.partition("=")
            if sep and key:
                out[key] = value
        return out

    def search_path(self) -> list[str]:
        return (self.environ().get("PATH") or DEFAULT_PATH).split(":")


@dataclass
class Container:
    bundle: str
    rootfs: str
    process: Process
    readonly: bool = False
    hostname: str | None = None
    domainname: str | None = None
    mounts: list[Mount] = field(default_factory=list)
    namespaces: list[Namespace] = field(default_factory=list)
    uid_mappings: list[IdMap] = field(default_factory=list)
    gid_mappings: list[IdMap] = field(default_factory=list)
    masked_paths: list[str] = field(default_factory=list)
    readonly_paths: list[str] = field(default_factory=list)
    devices: list[Device] = field(default_factory=list)
    rootfs_propagation: int = 0
    sysctl: dict[str, str] = field(default_factory=dict)
    cgroups_path: str = ""
    resources: dict[str, Any] = field(default_factory=dict)
    seccomp: dict[str, Any] | None = None
    hooks: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    annotations: dict[str, str] = field(default_factory=dict)

    def namespace(self, type: str) -> Namespace | None:
        for ns in self.namespaces:
            if ns.type == type:
                return ns
        return None

    def new_namespace(self, type: str) -> bool:
        ns = self.namespace(type)
        return ns is not None and not ns.path


def _invalid(msg: str) -> errdefs.InvalidArgument:
    return errdefs.InvalidArgument(f"invalid OCI spec: {msg}")


def _int(value: Any, what: str, *, default: int | None = None) -> int:
    if value is None and default is not None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise _invalid(f"{what} must be an integer, got {value!r}")
    return value


def parse_mount(m: dict[str, Any], bundle: str) -> Mount:
    if not isinstance(m, dict) or not m.get("destination"):
        raise _invalid(f"mount without destination: {m!r}")
    dest = m["destination"]
    if not os.path.isabs(dest):
        # runc accepts relative destinations as relative to "/" (with a warning).
        dest = "/" + dest
    mtype = m.get("type") or ""
    source = m.get("source") or ""
    flags = 0
    propagation: list[int] = []
    data: list[str] = []
    extensions: set[str] = set()
    for opt in m.get("options") or []:
        if opt in _FLAG_OPTIONS:
            on, off = _FLAG_OPTIONS[opt]
            flags = (flags | on) & ~off
        elif opt in PROPAGATION:
            propagation.append(PROPAGATION[opt])
        elif opt in _EXTENSIONS:
            extensions.add(opt)
        elif opt in ("idmap", "ridmap"):
            raise _invalid(f"mount {dest}: idmapped mounts are not supported")
        else:
            data.append(opt)
    if mtype == "bind":
        flags |= sys_.MS_BIND
    if flags & sys_.MS_BIND and source and not os.path.isabs(source):
        source = os.path.join(bundle, source)
    return Mount(dest, mtype, source, flags, propagation, ",".join(data), extensions)


def parse_process(p: dict[str, Any] | None, *, known_last: int) -> Process:
    if not isinstance(p, dict):
        raise _invalid("process is missing")
    args = p.get("args")
    if not args or not all(isinstance(a, str) for a in args):
        raise _invalid("process.args must be a non-empty list of strings")
    user = p.get("user") or {}
    rlimits: list[tuple[int, int, int]] = []
    seen: set[str] = set()
    for r in p.get("rlimits") or []:
        name = r.get("type")
        if name not in RLIMITS:
            raise _invalid(f"unknown rlimit {name!r}")
        if name in seen:
            raise _invalid(f"duplicate rlimit {name}")
        seen.add(name)
        rlimits.append((RLIMITS[name], _int(r.get("soft"), f"{name}.soft"),
                        _int(r.get("hard"), f"{name}.hard")))
    cwd = p.get("cwd") or "/"
    if not os.path.isabs(cwd):
        raise _invalid(f"process.cwd {cwd!r} must be absolute")
    umask = user.get("umask")
    return Process(
        args=list(args),
        env=[e for e in p.get("env") or [] if isinstance(e, str)],
        cwd=cwd,
        terminal=bool(p.get("terminal")),
        uid=_int(user.get("uid"), "user.uid", default=0),
        gid=_int(user.get("gid"), "user.gid", default=0),
        additional_gids=[_int(g, "additionalGids") for g in user.get("additionalGids") or []],
        umask=None if umask is None else _int(umask, "user.umask"),
        caps=caps.from_spec(p.get("capabilities"), known_last=known_last),
        rlimits=rlimits,
        no_new_privileges=bool(p.get("noNewPrivileges")),
        oom_score_adj=p.get("oomScoreAdj"),
    )


def _idmaps(raw: list[dict[str, Any]] | None, what: str) -> list[IdMap]:
    out = []
    for m in raw or []:
        out.append(IdMap(_int(m.get("containerID"), f"{what}.containerID"),
                         _int(m.get("hostID"), f"{what}.hostID"),
                         _int(m.get("size"), f"{what}.size")))
    return out


def _device(d: dict[str, Any]) -> Device:
    path = d.get("path")
    if not path or not os.path.isabs(path):
        raise _invalid(f"device path {path!r} must be absolute")
    dtype = d.get("type")
    if dtype not in ("c", "b", "u", "p"):
        raise _invalid(f"device {path}: type {dtype!r}")
    mode = d.get("fileMode")
    return Device(path, dtype, _int(d.get("major"), "major", default=0),
                  _int(d.get("minor"), "minor", default=0),
                  0o666 if mode is None else _int(mode, "fileMode"),
                  _int(d.get("uid"), "uid", default=0), _int(d.get("gid"), "gid", default=0))


def parse(config: dict[str, Any], bundle: str | Path, *, known_last: int | None = None
          ) -> Container:
    """Validate ``config`` (a parsed config.json of the bundle) into a Container."""
    bundle = os.path.abspath(str(bundle))
    if known_last is None:
        known_last = caps.last_cap()
    root = config.get("root") or {}
    rootfs = root.get("path") or "rootfs"
    if not os.path.isabs(rootfs):
        rootfs = os.path.join(bundle, rootfs)
    rootfs = os.path.realpath(rootfs)
    linux = config.get("linux") or {}

    namespaces: list[Namespace] = []
    for ns in linux.get("namespaces") or []:
        t = ns.get("type")
        if t not in NAMESPACE_FLAGS:
            raise _invalid(f"unknown namespace type {t!r}")
        if any(n.type == t for n in namespaces):
            raise _invalid(f"duplicate namespace {t}")
        namespaces.append(Namespace(t, ns.get("path") or None))

    c = Container(
        bundle=bundle,
        rootfs=rootfs,
        process=parse_process(config.get("process"), known_last=known_last),
        readonly=bool(root.get("readonly")),
        hostname=config.get("hostname") or None,
        domainname=config.get("domainname") or None,
        mounts=[parse_mount(m, bundle) for m in config.get("mounts") or []],
        namespaces=namespaces,
        uid_mappings=_idmaps(linux.get("uidMappings"), "uidMappings"),
        gid_mappings=_idmaps(linux.get("gidMappings"), "gidMappings"),
        masked_paths=list(linux.get("maskedPaths") or []),
        readonly_paths=list(linux.get("readonlyPaths") or []),
        devices=[_device(d) for d in linux.get("devices") or []],
        sysctl=dict(linux.get("sysctl") or {}),
        cgroups_path=linux.get("cgroupsPath") or "",
        resources=dict(linux.get("resources") or {}),
        seccomp=linux.get("seccomp") or None,
        hooks={k: list(v or []) for k, v in (config.get("hooks") or {}).items()},
        annotations=dict(config.get("annotations") or {}),
    )
    prop = linux.get("rootfsPropagation")
    if prop:
        if prop not in PROPAGATION:
            raise _invalid(f"rootfsPropagation {prop!r}")
        c.rootfs_propagation = PROPAGATION[prop]

    if not os.path.isdir(c.rootfs):
        raise _invalid(f"rootfs {c.rootfs!r} is not a directory")
    if c.hostname and not c.new_namespace("uts"):
        raise _invalid("hostname needs a new uts namespace")
    if c.domainname and not c.new_namespace("uts"):
        raise _invalid("domainname needs a new uts namespace")
    if c.new_namespace("user") and not (c.uid_mappings and c.gid_mappings):
        raise _invalid("a new user namespace needs uidMappings and gidMappings")
    if (c.uid_mappings or c.gid_mappings) and c.namespace("user") is None:
        raise _invalid("uid/gid mappings need a user namespace")
    if c.namespace("mount") is None:
        raise _invalid("a mount namespace is required")
    for key in c.sysctl:
        if "/" in key or ".." in key.split("."):
            raise _invalid(f"sysctl {key!r}")
    for hook_kind, hooks in c.hooks.items():
        for h in hooks:
            if not isinstance(h, dict) or not h.get("path"):
                raise _invalid(f"{hook_kind} hook without path")
    return c
