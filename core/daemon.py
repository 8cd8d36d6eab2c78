"""berthd: one trio.run, every task in a nursery the daemon owns."""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import gc
import os
import signal
import sys
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import structlog
import trio

from berth.core import __version__, config, errdefs, log as logsetup

log = structlog.get_logger("berthd")

# Built-in plugin modules, registered with pluggy exactly like third-party ones.
BUILTIN_PLUGINS = [
    "berth.core.metadata.plugin",
    "berth.core.events.plugin",
    "berth.core.services.version",
    "berth.core.services.health",
    "berth.core.services.namespaces",
    "berth.core.services.leases",
    "berth.core.services.events",
    "berth.core.services.eventlog",
    "berth.core.services.introspection",
    "berth.core.gc.scheduler",
    "berth.core.services.content",
    "berth.core.services.images",
    "berth.plugins.snapshotters.overlayfs",
    "berth.plugins.snapshotters.native",
    "berth.core.services.snapshots",
    "berth.plugins.differ.plugin",
    "berth.core.services.diff",
    "berth.core.services.containers",
    "berth.core.runtime.plugin",
    "berth.plugins.networks.none",
    "berth.plugins.networks.host",
    "berth.plugins.networks.cni.plugin",
    "berth.core.networks.plugin",
    "berth.core.services.networks",
    "berth.core.services.tasks",
    "berth.plugins.cri.plugin",
]


class RootInUse(Exception):
    pass


ROOT_MODE = 0o700
# The state folder lets others through, never list: a user namespace's root must reach its
# rootfs under a bundle, and a socket configured for a group must be reachable by it.
# Everything below it is private unless made otherwise on purpose (containerd's modes).
STATE_MODE = 0o711


def make_top_dirs(root: Path, state: Path) -> None:
    """Create root and state with their modes, and tighten them if they exist (an older
    berth made the root 0711 and left what is below world-readable)."""
    for path, mode in ((root, ROOT_MODE), (state, STATE_MODE)):
        path.mkdir(parents=True, exist_ok=True, mode=mode)
        os.chmod(path, mode)


@contextlib.contextmanager
def root_lock(root: Path) -> Iterator[None]:
    """Hold an exclusive lock on the root for the daemon's lifetime.

    The kernel drops a flock when the process dies, even by SIGKILL, so a crashed
    daemon never leaves a stale lock behind.
    """
    root.mkdir(parents=True, exist_ok=True, mode=ROOT_MODE)
    path = root / "berthd.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise RootInUse(
                f"root {root} is in use by another berthd (pid {holder})"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)


def _registrations(cfg: config.Config) -> list[Any]:
    from berth.core.plugin.graph import collect, plugin_manager

    return collect(plugin_manager(BUILTIN_PLUGINS))


@contextlib.contextmanager
def _naming(what: str, address: Path) -> Iterator[None]:
    """Say which socket failed: bind() errors carry no path of their own."""
    try:
        yield
    except OSError as e:
        raise OSError(e.errno, f"cannot serve {what} on {address}: {e.strerror}") from e


async def serve(cfg: config.Config, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    """Initialise plugins, serve gRPC and ttrpc until cancelled."""
    from berth.core.grpc import bridge, server as grpc_server
    from berth.core.plugin.graph import init_all
    from berth.core.ttrpc.server import Server as TTRPCServer

    make_top_dirs(cfg.root, cfg.state)
    registrations = _registrations(cfg)
    disabled = set(cfg.data.get("disabled_plugins", []))
    async with trio.open_nursery() as nursery:
        plugins = await init_all(
            registrations, root=cfg.root, state=cfg.state, plugin_config=cfg.plugins,
            daemon_config=cfg, nursery=nursery, disabled=disabled,
        )
        for uri in cfg.data.get("required_plugins", []):
            p = next((p for p in plugins.ordered if p.registration.uri == uri), None)
            if p is None or not p.ok:
                raise errdefs.FailedPrecondition(
                    f"required plugin {uri} did not load: {p.error if p else 'not registered'}",
                    raw=True,
                )
        max_recv = int(cfg.data["grpc"]["max_recv_message_size"])
        routes: dict[str, Any] = {}
        ttrpc = TTRPCServer()
        for p in plugins.ordered:
            if not p.ok:
                continue
            base = getattr(p.instance, "base", None)
            if base is not None:
                routes.update(bridge.handlers_for(p.instance, base, max_recv=max_recv))
            # A plugin serving several services (CRI: RuntimeService and ImageService).
            for svc in (p.instance.grpc_services() if hasattr(p.instance, "grpc_services")
                        else ()):
                routes.update(bridge.handlers_for(svc, svc.base, max_recv=max_recv))
            if hasattr(p.instance, "ttrpc_services"):
                for name, methods in p.instance.ttrpc_services().items():
                    ttrpc.register(name, methods)
        g, t = cfg.data["grpc"], cfg.data["ttrpc"]
        # ttrpc first, as containerd does: clients take the gRPC socket as the sign that
        # the daemon is up, and shims they start at once dial the ttrpc one.
        with _naming("ttrpc", cfg.ttrpc_address):
            await nursery.start(partial(ttrpc.serve_unix, str(cfg.ttrpc_address),
                                        owner=(int(t["uid"]), int(t["gid"]))))
        with _naming("gRPC", cfg.address):
            await nursery.start(lambda task_status: grpc_server.serve(
                routes, cfg.address, tcp_address=g.get("tcp_address", ""), uid=g["uid"],
                gid=g["gid"], max_recv=max_recv, task_status=task_status))
        log.info("berthd successfully booted", version=__version__, address=str(cfg.address),
                 root=str(cfg.root), state=str(cfg.state))
        # Work that must not hold the API back (the runtime's recovery of the tasks a
        # previous berthd left) starts now, in the nursery each plugin was given.
        for p in plugins.ordered:
            hook = getattr(p.instance, "serving", None) if p.ok else None
            if callable(hook):
                try:
                    hook()
                except Exception:
                    log.exception("plugin failed to start its background work",
                                  plugin=p.registration.uri)
        task_status.started(plugins)


async def run(cfg: config.Config) -> None:
    """The daemon's life: serve until SIGTERM or SIGINT, then shut down cleanly."""
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals, \
            root_lock(cfg.root):
        async with trio.open_nursery() as nursery:
            await nursery.start(serve, cfg)
            # What start-up made lives as long as berthd (modules, classes, plugins): moved
            # out of the collector's generations, it is no longer traversed by every full
            # collection (~30 ms each, one per ~70 container runs; with it, the cyclic
            # GC's own time drops from ~0.75 to ~0.12 ms per ``ctr run``).
            gc.freeze()
            gc.enable()  # disabled by main() for the start-up
            async for signum in signals:
                log.info("stopping", signal=signal.Signals(signum).name)
                nursery.cancel_scope.cancel()
                break
    log.info("stopped")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="berthd", description="berth container supervisor")
    p.add_argument("--config", "-c", type=Path, default=None,
                   help=f"TOML config file (default {config.DEFAULT_CONFIG_PATH} if present)")
    p.add_argument("--root", help="persistent state directory")
    p.add_argument("--state", help="runtime state directory")
    p.add_argument("--address", "-a", help="gRPC unix socket path")
    p.add_argument("--log-level", "-l", help="trace, debug, info, warn, error")
    p.add_argument("--version", "-v", action="version", version=f"berthd {__version__}")
    sub = p.add_subparsers(dest="command")
    c = sub.add_parser("config", help="print configuration")
    c.add_argument("action", choices=["default", "dump"])
    return p


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    o: dict[str, Any] = {}
    if args.root:
        o["root"] = args.root
    if args.state:
        o["state"] = args.state
    if args.address:
        o.setdefault("grpc", {})["address"] = args.address
        # The ttrpc socket sits beside the gRPC one unless configured otherwise.
        o.setdefault("ttrpc", {})["address"] = args.address + ".ttrpc"
    if args.log_level:
        o.setdefault("debug", {})["level"] = args.log_level
    return o


def main(argv: list[str] | None = None) -> int:
    # Until berthd serves, it makes mostly objects that live as long as it does (modules,
    # classes, plugins): cyclic collections meanwhile free nothing and cost about a tenth
    # of the start-up's CPU. ``run`` turns them back on once the servers are up.
    gc.disable()
    try:
        return _main(argv)
    finally:
        gc.enable()


def _main(argv: list[str] | None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "config" and args.action == "default":
            cfg = config.Config()
            cfg.plugin_defaults(_registrations(cfg))
            sys.stdout.write(cfg.dumps())
            return 0
        # The file alone first: a flag must not paper over a mistyped section.
        config.check_shape(config.load(args.config).data, config.DEFAULTS,
                    f"config file {args.config or config.DEFAULT_CONFIG_PATH}: ")
        cfg = config.load(args.config, overrides=_overrides(args))
        if args.address is None and "address" not in cfg.data["ttrpc"]:
            cfg.data["ttrpc"]["address"] = str(cfg.address) + ".ttrpc"
        if args.command == "config":
            cfg.plugin_defaults(_registrations(cfg))
            sys.stdout.write(cfg.dumps())
            return 0
        logsetup.setup(cfg.data["debug"]["level"],
                       json={"json": True, "text": False}.get(cfg.data["debug"]["format"]))
        try:
            trio.run(run, cfg)
        except BaseExceptionGroup as group:
            # Nurseries wrap a start-up failure in groups; the person starting the
            # daemon needs the one error, not a traceback.
            leaf = errdefs.unwrap_group(group)
            if isinstance(leaf, (RootInUse, errdefs.BerthError, OSError)):
                raise leaf from None
            raise
    except RootInUse as e:
        print(f"berthd: {e}", file=sys.stderr)
        return 1
    except errdefs.BerthError as e:
        print(f"berthd: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"berthd: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
