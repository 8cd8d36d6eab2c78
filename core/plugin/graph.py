"""Ordering and initialising plugins, recording failures as containerd does."""

from __future__ import annotations

import importlib
import platform
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pluggy
import structlog
import trio

from berth.core import errdefs
from berth.core.plugin import hookspecs
from berth.core.plugin.registration import ALL, InitContext, Registration, SkipPlugin

log = structlog.get_logger("plugins")


def host_platform() -> tuple[str, str, str]:
    machine = platform.machine().lower()
    arch = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm"}.get(machine, machine)
    variant = "v7" if machine == "armv7l" else ""
    return ("linux", arch, variant)


@dataclass
class Plugin:
    """One registration and the outcome of its init."""

    registration: Registration
    instance: Any = None
    error: BaseException | None = None
    skipped: bool = False
    exports: dict[str, str] = field(default_factory=dict)
    platforms: list[tuple[str, str, str]] = field(default_factory=list)
    capabilities: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.error is None and not self.skipped and self.instance is not None


class PluginSet:
    """The initialised plugins, in init order, looked up by type and id."""

    def __init__(self) -> None:
        self.ordered: list[Plugin] = []

    def add(self, p: Plugin) -> None:
        self.ordered.append(p)

    def get(self, type_: str, id_: str | None = None) -> Any:
        """The instance of a plugin that initialised; NotFound otherwise."""
        for p in self.ordered:
            r = p.registration
            if r.type == type_ and (id_ is None or r.id == id_):
                if p.ok:
                    return p.instance
                if id_ is not None:
                    raise errdefs.NotFound(f"plugin {r.uri} failed: {p.error}", raw=True)
        raise errdefs.NotFound(f"no plugins registered for {type_}" + (f".{id_}" if id_ else ""))

    def by_type(self, type_: str) -> dict[str, Any]:
        return {p.registration.id: p.instance for p in self.ordered
                if p.registration.type == type_ and p.ok}


def plugin_manager(builtin_modules: list[str], *, entry_points: bool = True
                   ) -> pluggy.PluginManager:
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    for name in builtin_modules:
        pm.register(importlib.import_module(name), name=name)
    if entry_points:
        pm.load_setuptools_entrypoints(hookspecs.ENTRY_POINT_GROUP)
    return pm


def collect(pm: pluggy.PluginManager) -> list[Registration]:
    """All registrations, in registration order (pluggy calls later-registered first)."""
    out: list[Registration] = []
    seen: set[str] = set()
    for batch in reversed(pm.hook.berth_plugins()):
        for r in batch:
            if r.uri in seen:
                raise ValueError(f"plugin {r.uri} registered twice")
            seen.add(r.uri)
            out.append(r)
    return out


def order(registrations: list[Registration]) -> list[Registration]:
    """Dependency order: everything of a required type comes first; "*" means all others.

    Like containerd's plugin.Graph, a requirement names a type, not a plugin, and a
    cycle is a programming error.
    """
    by_type: dict[str, list[Registration]] = {}
    for r in registrations:
        by_type.setdefault(r.type, []).append(r)
    out: list[Registration] = []
    placed: set[str] = set()
    visiting: set[str] = set()

    def visit(r: Registration) -> None:
        if r.uri in placed:
            return
        if r.uri in visiting:
            raise ValueError(f"plugin dependency cycle at {r.uri}")
        visiting.add(r.uri)
        if ALL not in r.requires:
            for t in r.requires:
                for dep in by_type.get(t, []):
                    visit(dep)
        visiting.discard(r.uri)
        placed.add(r.uri)
        out.append(r)

    for r in registrations:
        if ALL not in r.requires:
            visit(r)
    for r in registrations:
        if ALL in r.requires:
            placed.add(r.uri)
            out.append(r)
    return out


async def init_all(
    registrations: list[Registration],
    *,
    root: Path,
    state: Path,
    plugin_config: dict[str, dict[str, Any]],
    daemon_config: Any,
    nursery: trio.Nursery,
    disabled: AbstractSet[str] = frozenset(),
) -> PluginSet:
    """Initialise in dependency order; a failing plugin is recorded, never fatal here."""
    plugins = PluginSet()
    for r in order(registrations):
        if r.uri in disabled:
            log.info("plugin disabled", type=r.type, id=r.id)
            continue
        p = Plugin(r)
        cfg = dict(r.config)
        cfg.update(plugin_config.get(r.uri, {}))
        ctx = InitContext(
            registration=r,
            root=root / r.uri,
            state=state / r.uri,
            config=cfg,
            daemon_config=daemon_config,
            plugins=plugins,
            nursery=nursery,
            platforms=[],
            capabilities=list(r.capabilities),
        )
        missing = [t for t in r.requires if t != ALL and not plugins.by_type(t)]
        try:
            if missing:
                raise errdefs.NotFound(f"no plugins registered for {missing[0]}")
            p.instance = await r.init(ctx)
        except SkipPlugin as e:
            p.skipped = True
            p.error = e
            log.info("skip loading plugin", type=r.type, id=r.id, reason=str(e))
        except Exception as e:
            p.error = e
            log.warning("failed to load plugin", type=r.type, id=r.id, error=str(e))
        else:
            log.debug("loaded plugin", type=r.type, id=r.id)
        p.exports = ctx.exports
        p.platforms = ctx.platforms
        p.capabilities = ctx.capabilities
        plugins.add(p)
    return plugins
