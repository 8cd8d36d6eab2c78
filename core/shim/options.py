"""Which OCI runtime runs a container, from the task's runtime options.

containerd passes the container's runtime options as an Any in CreateTaskRequest:
- ``containerd.runc.v1.Options`` (what ``ctr run --runc-binary`` and CRI's runc
  runtimes send): ``binary_name`` picks an external runc-compatible binary, ``root``
  its state root (``<root>/<namespace>``, as containerd's runc shim uses it);
- ``runtimeoptions.v1.Options`` (what ``ctr run --runtime-config-path`` and CRI send
  for other runtime types): ``config_path`` names a TOML file holding the same keys,
  in the proto's snake_case or CRI's CamelCase (``BinaryName = "crun"``).
No binary means berth's in-process runtime; the runtime plugin serving a binary is found
through its registration (``berth.core.shim.runtimes``). The choice is written to the
bundle so that the ``delete`` action, run after the shim is gone, cleans up with the
same runtime and root.
"""

from __future__ import annotations

import json
import os

from berth.core import errdefs
from berth.core.shim import wire

RUNC_OPTIONS = "containerd.runc.v1.Options"
RUNTIME_OPTIONS = "runtimeoptions.v1.Options"
CHOICE_FILE = "berth-runtime.json"
INPROCESS = ""


class RuntimeChoice:
    """The runtime for one container (a plain class: ``delete`` must import little)."""

    FIELDS = ("binary", "root", "systemd_cgroup", "no_pivot_root", "no_new_keyring",
              "io_uid", "io_gid", "cleanup")

    def __init__(self, binary: str = INPROCESS, root: str = "", systemd_cgroup: bool = False,
                 no_pivot_root: bool = False, no_new_keyring: bool = False, io_uid: int = 0,
                 io_gid: int = 0, cleanup: str = "") -> None:
        self.binary = binary  # "" = in-process; else a runc-compatible binary
        self.root = root      # the runtime's state root, namespace included
        self.systemd_cgroup = systemd_cgroup
        self.no_pivot_root = no_pivot_root
        self.no_new_keyring = no_new_keyring
        self.io_uid = io_uid
        self.io_gid = io_gid
        # The serving runtime plugin's force-delete entry ("module:callable"), recorded
        # so that ``delete`` imports that module alone (berth.core.shim.runtimes).
        self.cleanup = cleanup

    @property
    def name(self) -> str:
        return os.path.basename(self.binary) if self.binary else "berth"

    def as_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.FIELDS}

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, RuntimeChoice):
            return NotImplemented
        return self.as_dict() == other.as_dict()

    def __repr__(self) -> str:
        return f"RuntimeChoice({self.as_dict()!r})"

    def to_json(self) -> str:
        return json.dumps(self.as_dict())

    @classmethod
    def from_json(cls, text: str) -> RuntimeChoice:
        raw = json.loads(text)
        return cls(**{k: v for k, v in raw.items() if k in cls.FIELDS})


def _strip(type_url: str) -> str:
    return type_url.rsplit("/", 1)[-1]


_KEYS = {
    "binary_name": "binary", "BinaryName": "binary",
    "root": "root", "Root": "root",
    "systemd_cgroup": "systemd_cgroup", "SystemdCgroup": "systemd_cgroup",
    "no_pivot_root": "no_pivot_root", "NoPivotRoot": "no_pivot_root",
    "no_new_keyring": "no_new_keyring", "NoNewKeyring": "no_new_keyring",
    "io_uid": "io_uid", "IoUid": "io_uid",
    "io_gid": "io_gid", "IoGid": "io_gid",
}


def _from_mapping(values: dict) -> dict:
    out = {}
    for key, value in values.items():
        field = _KEYS.get(key)
        if field is not None:
            out[field] = value
    return out


def decode(type_url: str, value: bytes) -> dict:
    """The option fields berth uses, from a runtime options Any (empty: none)."""
    name = _strip(type_url)
    if not name:
        return {}
    if name == RUNC_OPTIONS:
        from berth.core.api.containerd.runc.v1 import Options

        opts = Options().parse(value)
        return {"binary": opts.binary_name, "root": opts.root,
                "systemd_cgroup": opts.systemd_cgroup,
                "no_pivot_root": opts.no_pivot_root, "no_new_keyring": opts.no_new_keyring,
                "io_uid": opts.io_uid, "io_gid": opts.io_gid}
    if name == RUNTIME_OPTIONS:
        # runtimeoptions.v1.Options{type_url = 1, config_path = 2}: not in core/api.
        config_path = wire.string_fields(value).get(2, "")
        if not config_path:
            return {}
        import tomllib

        try:
            with open(config_path, "rb") as f:
                return _from_mapping(tomllib.load(f))
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise errdefs.InvalidArgument(
                f"runtime config {config_path}: {exc}", raw=True) from exc
    raise errdefs.InvalidArgument(f"unsupported runtime options type {name}", raw=True)


def choose(type_url: str, value: bytes, *, namespace: str, state_base: str) -> RuntimeChoice:
    """The runtime for a container; roots default under the daemon's state folder."""
    fields = decode(type_url, value)
    choice = RuntimeChoice(**fields)
    base = choice.root or os.path.join(state_base, choice.name)
    choice.root = os.path.join(base, namespace)
    return choice


def save(bundle: str, choice: RuntimeChoice) -> None:
    with open(os.path.join(bundle, CHOICE_FILE), "w") as f:
        f.write(choice.to_json())


def load(bundle: str) -> RuntimeChoice | None:
    try:
        with open(os.path.join(bundle, CHOICE_FILE)) as f:
            return RuntimeChoice.from_json(f.read())
    except FileNotFoundError:
        return None
