"""berthd's configuration: TOML, with every default written down in one place."""

from __future__ import annotations

import copy
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w

from berth.core import errdefs

DEFAULT_CONFIG_PATH = Path("/etc/berth/config.toml")

DEFAULTS: dict[str, Any] = {
    "version": 2,
    "root": "/var/lib/berth",
    "state": "/run/berth",
    "disabled_plugins": [],
    "required_plugins": [],
    "grpc": {
        "address": "/run/berth/berth.sock",
        "tcp_address": "",
        "uid": 0,
        "gid": 0,
        "max_recv_message_size": 16 << 20,
        "max_send_message_size": 16 << 20,
    },
    "ttrpc": {"address": "/run/berth/berth.sock.ttrpc", "uid": 0, "gid": 0},
    "debug": {"level": "info", "format": ""},
    "plugins": {},
}


@dataclass
class Config:
    """The merged configuration (defaults, then file, then flags)."""

    data: dict[str, Any] = field(default_factory=lambda: copy.deepcopy(DEFAULTS))

    @property
    def root(self) -> Path:
        return Path(self.data["root"])

    @property
    def state(self) -> Path:
        return Path(self.data["state"])

    @property
    def address(self) -> Path:
        return Path(self.data["grpc"]["address"])

    @property
    def ttrpc_address(self) -> Path:
        return Path(self.data["ttrpc"]["address"])

    @property
    def plugins(self) -> dict[str, dict[str, Any]]:
        return self.data.get("plugins", {})

    def plugin_defaults(self, registrations: list[Any]) -> None:
        """Fill each plugin's section with its declared defaults (for `config default`)."""
        for r in registrations:
            section = self.data["plugins"].setdefault(r.uri, {})
            for k, v in r.config.items():
                section.setdefault(k, copy.deepcopy(v))

    def dumps(self) -> str:
        return tomli_w.dumps(self.data)


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            _merge(base[k], v)
        else:
            base[k] = v
    return base


def load(path: Path | None, *, overrides: dict[str, Any] | None = None) -> Config:
    """Defaults, then the file at ``path`` (a missing default file is fine), then overrides."""
    cfg = Config()
    explicit = path is not None
    path = path or DEFAULT_CONFIG_PATH
    try:
        text = path.read_text()
    except FileNotFoundError:
        if explicit:
            raise errdefs.NotFound(f"config file {path}") from None
        text = ""
    if text:
        try:
            _merge(cfg.data, tomllib.loads(text))
        except tomllib.TOMLDecodeError as e:
            raise errdefs.InvalidArgument(f"config file {path}: {e}", raw=True) from None
    if overrides:
        _merge(cfg.data, overrides)
    if cfg.data.get("version", 2) != 2:
        raise errdefs.InvalidArgument(
            f"config file {path}: unsupported version {cfg.data['version']}", raw=True
        )
    return cfg


def check_shape(data: dict[str, Any], defaults: dict[str, Any], prefix: str = "",
                where: str = "") -> None:
    """Refuse a config whose known keys have the wrong TOML type, naming the key.

    Without this a `grpc = 5` surfaces much later as a TypeError deep in start-up.
    """
    for key, default in defaults.items():
        if key not in data:
            continue
        value, name = data[key], f"{where}{key}"
        if isinstance(default, dict):
            if not isinstance(value, dict):
                raise errdefs.InvalidArgument(f"{prefix}{name} must be a table", raw=True)
            if key != "plugins":  # plugin sections are checked by their owners
                check_shape(value, default, prefix, f"{name}.")
            continue
        kinds: dict[type, tuple[type, str]] = {
            str: (str, "a string"), int: (int, "an integer"), list: (list, "an array"),
        }
        want, what = kinds.get(type(default), (object, ""))
        if not isinstance(value, want) or isinstance(value, bool) is not isinstance(default, bool):
            raise errdefs.InvalidArgument(f"{prefix}{name} must be {what}", raw=True)
