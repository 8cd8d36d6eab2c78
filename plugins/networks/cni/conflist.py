"""Network configuration lists in a config dir, as libcni reads them (sans-io parsing).

``*.conflist`` files hold ``{"cniVersion", "name", "plugins": [...]}``; a ``*.conf`` or
``*.json`` file holds one plugin's config and is read as a list of one. One network per
name: the first file in name order wins, as libcni's ConfFiles order does.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from berth.core import errdefs, identifiers

EXTENSIONS = (".conflist", ".conf", ".json")


@dataclass
class ConfList:
    name: str
    cni_version: str
    plugins: list[dict[str, Any]]
    path: str = ""
    text: str = ""
    disable_check: bool = False

    def capabilities(self) -> set[str]:
        out: set[str] = set()
        for p in self.plugins:
            caps = p.get("capabilities") or {}
            out.update(k for k, v in caps.items() if v)
        return out


@dataclass
class ConfDir:
    networks: dict[str, ConfList] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)  # file -> why it was skipped


def parse(text: str | bytes, path: str = "") -> ConfList:
    """A conflist (or a single plugin's conf); InvalidArgument saying what is wrong."""
    where = path or "network config"
    try:
        doc = json.loads(text)
    except (ValueError, UnicodeDecodeError) as e:
        raise errdefs.InvalidArgument(f"{where}: invalid JSON: {e}", raw=True) from None
    if not isinstance(doc, dict):
        raise errdefs.InvalidArgument(f"{where}: not a JSON object", raw=True)
    if "plugins" not in doc and "type" in doc:
        single = {k: v for k, v in doc.items() if k not in ("name", "cniVersion")}
        doc = {"name": doc.get("name"), "cniVersion": doc.get("cniVersion", ""),
               "plugins": [single]}
    name, version, plugins = doc.get("name"), doc.get("cniVersion", ""), doc.get("plugins")
    if not isinstance(name, str) or not name:
        raise errdefs.InvalidArgument(f"{where}: no network name", raw=True)
    try:
        identifiers.validate(name)
    except errdefs.InvalidArgument as e:
        raise errdefs.InvalidArgument(f"{where}: network name {name!r}: {e}", raw=True) \
            from None
    if not isinstance(version, str):
        raise errdefs.InvalidArgument(f"{where}: cniVersion is not a string", raw=True)
    if not isinstance(plugins, list) or not plugins:
        raise errdefs.InvalidArgument(f"{where}: no plugins in network {name!r}", raw=True)
    for i, p in enumerate(plugins):
        if not isinstance(p, dict) or not isinstance(p.get("type"), str) or not p["type"]:
            raise errdefs.InvalidArgument(
                f"{where}: plugin {i} of network {name!r} has no type", raw=True)
        if "/" in p["type"] or p["type"] in (".", ".."):
            raise errdefs.InvalidArgument(
                f"{where}: plugin type {p['type']!r} is not a plain name", raw=True)
        caps = p.get("capabilities", {})
        if not isinstance(caps, dict):
            raise errdefs.InvalidArgument(
                f"{where}: capabilities of plugin {p['type']!r} is not an object", raw=True)
    text_s = text.decode() if isinstance(text, bytes) else text
    return ConfList(name=name, cni_version=version, plugins=plugins, path=path, text=text_s,
                    disable_check=bool(doc.get("disableCheck", False)))


def load_dir(path: Path) -> ConfDir:
    out = ConfDir()
    try:
        names = sorted(os.listdir(path))
    except FileNotFoundError:
        return out
    for n in names:
        if not n.endswith(EXTENSIONS):
            continue
        p = path / n
        try:
            conf = parse(p.read_bytes(), str(p))
        except errdefs.InvalidArgument as e:
            out.errors[str(p)] = e.message
            continue
        except OSError as e:
            out.errors[str(p)] = f"{p}: {e.strerror}"
            continue
        out.networks.setdefault(conf.name, conf)
    return out
