"""CDI (Container Device Interface) devices for CRI containers.

A container asks for devices by fully qualified name (``vendor.com/class=name``) in
``ContainerConfig.CDI_devices`` or in ``cdi.k8s.io/<anything>`` annotations (a comma-
separated list), as containerd's CRI reads them. Spec files (JSON, or YAML) are read from
``cdi_spec_dirs`` when the container is created; a later folder wins over an earlier one,
and two definitions of one device in the same folder make it unresolvable. The edits of
each device, and those of its spec file, go into the OCI spec: env (replacing a variable
of the same name), device nodes (filled from the host's node when the spec leaves type or
numbers out, with a cgroup allow rule), mounts (ordered parent first), hooks and
additional GIDs. Every device is resolved and every edit made on a copy first: a device
that is unknown, or an edit that cannot be made, fails the call with InvalidArgument and
leaves the spec as it was.

Not supported (refused by name when a requested device needs them): ``intelRdt`` and
``netDevices`` edits.
"""

from __future__ import annotations

import copy
import json
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog
import yaml

from berth.core import errdefs
from berth.core.oci import default_spec as oci

if TYPE_CHECKING:
    from berth.core.api.runtime import v1 as cri
    from berth.plugins.cri.config import CRIConfig

logger = structlog.get_logger("berth.cri.cdi")

ANNOTATION_PREFIX = "cdi.k8s.io/"
DEFAULT_SPEC_DIRS = ("/etc/cdi", "/var/run/cdi")
MAX_SPEC_FILE = 1 << 20
MAX_SPEC_FILES = 256  # per folder; what is read for one CreateContainer stays bounded
MAX_SPEC_BYTES = 16 << 20  # all folders together
HOOK_NAMES = ("prestart", "createRuntime", "createContainer", "startContainer",
              "poststart", "poststop")
_VENDOR = re.compile(r"[A-Za-z][A-Za-z0-9_.-]*[A-Za-z0-9]|[A-Za-z]")
_CLASS = re.compile(r"[A-Za-z][A-Za-z0-9_-]*[A-Za-z0-9]|[A-Za-z]")
_NAME = re.compile(r"[A-Za-z0-9]([A-Za-z0-9_.:-]*[A-Za-z0-9])?")
_UNSUPPORTED = ("intelRdt", "netDevices")


def _bad(msg: str) -> errdefs.InvalidArgument:
    return errdefs.InvalidArgument(msg, raw=True)


def parse_name(qualified: str) -> tuple[str, str]:
    """``vendor/class=name`` as (kind, name); InvalidArgument when it is not one."""
    kind, sep, name = qualified.partition("=")
    vendor, slash, cls = kind.partition("/")
    if not (sep and slash and _VENDOR.fullmatch(vendor) and _CLASS.fullmatch(cls)
            and _NAME.fullmatch(name)):
        raise _bad(f"CDI device {qualified!r} is not a qualified name (vendor.com/class=name)")
    return kind, name


def requested(cdi_devices: list[str], annotations: dict[str, str]) -> list[str]:
    """The devices a container asks for, in order, once each: the CRI field first."""
    out: list[str] = []
    names = list(cdi_devices)
    for key in sorted(annotations):
        if key.startswith(ANNOTATION_PREFIX):
            names += [n.strip() for n in annotations[key].split(",") if n.strip()]
    for n in names:
        if n not in out:
            out.append(n)
    return out


@dataclass
class Device:
    kind: str
    name: str
    edits: dict[str, Any]
    spec_edits: dict[str, Any]  # the edits of the device's spec file
    source: str


@dataclass
class Registry:
    """The devices of the spec folders, as read at one moment."""

    devices: dict[str, Device] = field(default_factory=dict)
    conflicts: dict[str, list[str]] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)  # file: why it was skipped


def _read(path: Path) -> bytes:
    # Non-blocking: a FIFO put in a spec folder must not hang CreateContainer.
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ValueError("not a regular file")
        with os.fdopen(os.dup(fd), "rb") as f:
            data = f.read(MAX_SPEC_FILE + 1)
    finally:
        os.close(fd)
    if len(data) > MAX_SPEC_FILE:
        raise ValueError("larger than 1 MiB")
    return data


def _load_file(path: Path, data: bytes) -> dict[str, Any]:
    doc = json.loads(data) if path.suffix == ".json" else yaml.load(
        data, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    if not isinstance(doc, dict):
        raise ValueError("not an object")
    if not isinstance(doc.get("cdiVersion"), str):
        raise ValueError("no cdiVersion")
    kind = doc.get("kind")
    if not isinstance(kind, str):
        raise ValueError("no kind")
    parse_name(f"{kind}=x")
    devices = doc.get("devices")
    if not isinstance(devices, list) or not devices:
        raise ValueError("no devices")
    for d in devices:
        if not isinstance(d, dict) or not isinstance(d.get("name"), str):
            raise ValueError("a device without a name")
        parse_name(f"{kind}={d['name']}")
        _check_edits(d.get("containerEdits"))
    _check_edits(doc.get("containerEdits"))
    return doc


def _check_edits(edits: Any) -> None:
    if edits is None:
        return
    if not isinstance(edits, dict):
        raise ValueError("containerEdits is not an object")
    for key in ("env", "deviceNodes", "mounts", "hooks", "additionalGids"):
        if edits.get(key) is not None and not isinstance(edits[key], list):
            raise ValueError(f"containerEdits.{key} is not a list")
    if not all(isinstance(e, str) and "=" in e and not e.startswith("=")
               for e in edits.get("env") or []):
        raise ValueError("containerEdits.env: entries are NAME=value strings")
    for key in ("deviceNodes", "mounts", "hooks"):
        if not all(isinstance(x, dict) for x in edits.get(key) or []):
            raise ValueError(f"containerEdits.{key}: entries are objects")


def load(spec_dirs: list[str] | tuple[str, ...]) -> Registry:
    """Read every spec file of ``spec_dirs`` (a broken file is skipped and noted)."""
    reg = Registry()
    budget = MAX_SPEC_BYTES
    for d in spec_dirs:
        here: dict[str, list[Device]] = {}
        try:
            files = sorted(p for p in Path(d).iterdir()
                           if p.suffix in (".json", ".yaml", ".yml"))
        except OSError:
            continue  # a folder that does not exist holds no device
        for path in files[MAX_SPEC_FILES:]:
            reg.errors[str(path)] = f"more than {MAX_SPEC_FILES} spec files in {d}"
        for path in files[:MAX_SPEC_FILES]:
            try:
                if budget <= 0:
                    raise ValueError(f"spec files past {MAX_SPEC_BYTES >> 20} MiB in all")
                data = _read(path)
                budget -= len(data)
                doc = _load_file(path, data)
            except (OSError, ValueError, yaml.YAMLError, errdefs.InvalidArgument) as e:
                reg.errors[str(path)] = str(e)
                logger.warning("CDI spec file skipped", path=str(path), error=str(e))
                continue
            for dev in doc["devices"]:
                q = f"{doc['kind']}={dev['name']}"
                here.setdefault(q, []).append(Device(
                    doc["kind"], dev["name"], dev.get("containerEdits") or {},
                    doc.get("containerEdits") or {}, str(path)))
        for q, defs in here.items():
            # A later folder overrides an earlier one; twice in one folder is a conflict.
            reg.conflicts.pop(q, None)
            reg.devices.pop(q, None)
            if len(defs) > 1:
                reg.conflicts[q] = [x.source for x in defs]
            else:
                reg.devices[q] = defs[0]
    return reg


def resolve(reg: Registry, names: list[str]) -> list[Device]:
    """The devices ``names`` ask for; InvalidArgument naming every one that is not known."""
    out, missing = [], []
    for q in names:
        parse_name(q)
        if q in reg.conflicts:
            raise _bad(f"CDI device {q!r} is defined more than once: "
                       f"{', '.join(reg.conflicts[q])}")
        if q not in reg.devices:
            missing.append(q)
        else:
            out.append(reg.devices[q])
    if missing:
        note = f" ({len(reg.errors)} spec file(s) skipped as broken)" if reg.errors else ""
        raise _bad(f"unresolvable CDI devices {', '.join(missing)}{note}")
    return out


def _strings(value: Any, what: str) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(x, str) for x in value):
        raise _bad(f"{what} must be a list of strings")
    return list(value)


def _number(node: dict[str, Any], key: str, path: str) -> int | None:
    value = node.get(key)
    if value is not None and (type(value) is not int or value < 0):
        raise _bad(f"CDI device node {path!r}: {key} must be a non-negative number")
    return value


def _device_node(node: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The spec's linux.devices entry and its cgroup rule (none for a FIFO)."""
    path = node.get("path")
    if not isinstance(path, str) or not path.startswith("/"):
        raise _bad(f"CDI device node {path!r}: path must be absolute")
    host = node.get("hostPath") or path
    if not isinstance(host, str) or not host.startswith("/"):
        raise _bad(f"CDI device node {path!r}: hostPath must be absolute")
    kind = node.get("type")
    if kind is not None and kind not in ("c", "b", "u", "p"):
        raise _bad(f"CDI device node {path!r}: unknown type {kind!r}")
    major, minor, mode = (_number(node, k, path) for k in ("major", "minor", "fileMode"))
    for key in ("uid", "gid"):
        _number(node, key, path)
    if kind is None or (kind != "p" and (major is None or minor is None)) or mode is None:
        try:
            st = os.stat(host)
        except OSError as e:
            raise _bad(f"CDI device node {host!r}: {e.strerror}") from None
        have = ("c" if stat.S_ISCHR(st.st_mode) else "b" if stat.S_ISBLK(st.st_mode)
                else "p" if stat.S_ISFIFO(st.st_mode) else "")
        if not have:
            raise _bad(f"CDI device node {host!r} is not a device")
        kind = kind or have
        if kind != "p" and (major is None or minor is None):
            major, minor = os.major(st.st_rdev), os.minor(st.st_rdev)
        if mode is None:
            mode = stat.S_IMODE(st.st_mode)
    perms = node.get("permissions") or "rwm"
    if not isinstance(perms, str) or set(perms) - set("rwm"):
        raise _bad(f"CDI device node {path!r}: permissions {perms!r}: only r, w, m")
    entry: dict[str, Any] = {"path": path, "type": kind, "fileMode": mode}
    if kind != "p":
        entry.update(major=major, minor=minor)
    for key in ("uid", "gid"):
        if node.get(key) is not None:
            entry[key] = node[key]
    rule = {"allow": True, "type": "c" if kind == "u" else kind, "major": major,
            "minor": minor, "access": perms}
    return entry, None if kind == "p" else rule


def _mount(m: dict[str, Any]) -> dict[str, Any]:
    src, dest = m.get("hostPath"), m.get("containerPath")
    if not isinstance(src, str) or not isinstance(dest, str) or not dest.startswith("/"):
        raise _bad(f"CDI mount {src!r} -> {dest!r}: hostPath and an absolute "
                   "containerPath are needed")
    options = _strings(m.get("options"), f"CDI mount {dest!r}: options")
    kind = m.get("type") or "bind"
    if not isinstance(kind, str):
        raise _bad(f"CDI mount {dest!r}: type must be a string")
    if kind == "bind" and not {"bind", "rbind"} & set(options):
        options.append("bind")
    return {"destination": dest, "type": kind, "source": src, "options": options}


def _hook(h: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    name, path = h.get("hookName"), h.get("path")
    if name not in HOOK_NAMES:
        raise _bad(f"CDI hook {name!r}: one of {', '.join(HOOK_NAMES)}")
    if not isinstance(path, str) or not path.startswith("/"):
        raise _bad(f"CDI hook {path!r}: path must be absolute")
    out: dict[str, Any] = {"path": path}
    for key in ("args", "env"):
        if h.get(key):
            out[key] = _strings(h[key], f"CDI hook {path!r}: {key}")
    if h.get("timeout") is not None:
        if type(h["timeout"]) is not int or h["timeout"] <= 0:
            raise _bad(f"CDI hook {path!r}: timeout must be a positive number of seconds")
        out["timeout"] = h["timeout"]
    return name, out


def _apply_edits(spec: dict[str, Any], edits: dict[str, Any], what: str) -> None:
    for key in _UNSUPPORTED:
        if edits.get(key):
            raise errdefs.NotImplemented_(f"CDI {what}: {key} edits are not supported",
                                          raw=True)
    process = spec["process"]
    if edits.get("env"):
        process["env"] = oci.replace_or_append_env(process.get("env") or [],
                                                   list(edits["env"]))
    linux = spec.setdefault("linux", {})
    for node in edits.get("deviceNodes") or []:
        entry, rule = _device_node(node)
        devices = [d for d in linux.get("devices") or [] if d["path"] != entry["path"]]
        linux["devices"] = [*devices, entry]
        if rule is not None:
            linux.setdefault("resources", {}).setdefault("devices", []).append(rule)
    if edits.get("mounts"):
        new = [_mount(m) for m in edits["mounts"]]
        dests = {m["destination"] for m in new}
        mounts = [m for m in spec.get("mounts") or [] if m["destination"] not in dests]
        # Parents before children, as CDI orders them; stable for the rest.
        spec["mounts"] = sorted([*mounts, *new],
                                key=lambda m: len(Path(m["destination"]).parts))
    for h in edits.get("hooks") or []:
        name, hook = _hook(h)
        spec.setdefault("hooks", {}).setdefault(name, []).append(hook)
    gids = edits.get("additionalGids") or []
    if gids:
        if not all(isinstance(g, int) and g >= 0 for g in gids):
            raise _bad(f"CDI {what}: additionalGids must be group ids")
        have = process["user"].setdefault("additionalGids", [])
        have.extend(g for g in gids if g not in have and g != 0)


def inject(spec: dict[str, Any], names: list[str], spec_dirs: list[str] | tuple[str, ...]
           ) -> dict[str, Any]:
    """``spec`` with the edits of the devices ``names`` (a new dict; ``spec`` untouched)."""
    if not names:
        return spec
    devices = resolve(load(spec_dirs), names)
    out = copy.deepcopy(spec)
    seen_specs: set[str] = set()
    for dev in devices:
        if dev.source not in seen_specs:  # a spec file's own edits once, whatever asks
            seen_specs.add(dev.source)
            _apply_edits(out, dev.spec_edits, dev.source)
        _apply_edits(out, dev.edits, f"{dev.kind}={dev.name}")
    return out


def for_container(spec: dict[str, Any], config: cri.ContainerConfig, cri_config: CRIConfig
                  ) -> dict[str, Any]:
    """The CreateContainer hook: the CDI devices ``config`` asks for, in ``spec``. With
    ``enable_cdi`` off a request is refused rather than the container run without them."""
    names = requested([d.name for d in config.cdi_devices], dict(config.annotations))
    if not names:
        return spec
    if not cri_config.enable_cdi:
        raise errdefs.FailedPrecondition(
            f"CDI devices {', '.join(names)} requested, but CDI is off (enable_cdi)",
            raw=True)
    return inject(spec, names, cri_config.cdi_spec_dirs)
