"""Argument parsing and dispatch for `berth`; each command group is its own module."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Awaitable, Callable
from typing import Any

from berth.core import __version__
from berth.core.client import connection

Handler = Callable[[argparse.Namespace, connection.Session], Awaitable[int | None]]


def _parser() -> argparse.ArgumentParser:
    from berth.core.cli import (
        containers,
        content,
        events,
        images,
        leases,
        namespaces,
        plugins,
        run,
        snapshots,
        tasks,
        version,
    )

    p = argparse.ArgumentParser(prog="berth", description="command line client for berthd")
    p.add_argument("--address", "-a", default=connection.default_address(),
                   help="berthd socket (env BERTH_ADDRESS)")
    p.add_argument("--namespace", "-n", default=connection.default_namespace(),
                   help="namespace (env BERTH_NAMESPACE)")
    p.add_argument("--format", choices=["auto", "table", "json"], default="auto",
                   help="output: tables on a terminal, plain columns otherwise, or json")
    p.add_argument("--version", action="version", version=f"berth {__version__}")
    sub = p.add_subparsers(dest="group", metavar="COMMAND")
    sub.required = True
    for module in (version, namespaces, plugins, events, leases, images, snapshots, content,
                   run, containers, tasks):
        module.register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    handler: Handler = args.handler
    # Library modules log through structlog; a CLI's stdout is its output, so only
    # warnings and errors are shown, on stderr.
    from berth.core import log

    log.setup("warn")
    try:
        return asyncio.run(_run(handler, args)) or 0
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # `berth events | head`: the reader left; stop quietly like other Unix tools.
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except CommandError as e:
        print(f"berth: {e}", file=sys.stderr)
        return e.exit_code


class CommandError(Exception):
    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


async def _run(handler: Handler, args: argparse.Namespace) -> int | None:
    from grpclib import GRPCError
    from grpclib.exceptions import StreamTerminatedError

    try:
        async with connection.connect(args.address, args.namespace) as session:
            return await handler(args, session)
    except GRPCError as e:
        raise CommandError(f"{e.status.name}: {e.message}") from None
    except (ConnectionRefusedError, FileNotFoundError) as e:
        raise CommandError(f"cannot connect to {args.address}: {e.strerror}") from None
    except StreamTerminatedError as e:
        raise CommandError(f"connection lost: {e}") from None


def labels_from(args: list[str]) -> dict[str, str]:
    """ctr's `key=value` arguments; a bare key means an empty value."""
    out: dict[str, str] = {}
    for a in args:
        k, _, v = a.partition("=")
        out[k] = v
    return out


def add(sub: Any, name: str, handler: Handler, *, help: str, aliases: list[str] | None = None
        ) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help, aliases=aliases or [])
    p.set_defaults(handler=handler)
    # Also accepted after the command, as in `berth ns ls --format json`.
    p.add_argument("--format", choices=["auto", "table", "json"], default=argparse.SUPPRESS)
    return p


if __name__ == "__main__":
    sys.exit(main())
