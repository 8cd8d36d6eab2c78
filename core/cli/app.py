"""Argument parsing and dispatch for `berth`; each command group is its own module."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Awaitable, Callable
from typing import Any, NoReturn

from berth.core import __version__
from berth.core.cli import errors
from berth.core.cli.errors import CommandError
from berth.core.client import connection

__all__ = ["EXAMPLES", "CommandError", "add", "group", "labels_from", "main", "parser"]

Handler = Callable[[argparse.Namespace, connection.Session], Awaitable[int | None]]


# Every command's and group's example, by its prog ("berth images pull"); filled as the
# parser is built, so tests can walk every command.
EXAMPLES: dict[str, str] = {}


class _Parser(argparse.ArgumentParser):
    """Usage mistakes as two short lines (what is wrong, where help is) rather than the
    whole usage block; exit status 2 as argparse's."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message}\nSee '{self.prog} --help'.\n")


def parser() -> argparse.ArgumentParser:
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

    p = _Parser(
        prog="berth", description="command line client for berthd (and containerd)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
               "  berth images pull docker.io/library/alpine:latest\n"
               "  berth run --rm -t docker.io/library/alpine:latest demo sh\n"
               "  berth --address /run/containerd/containerd.sock -n k8s.io tasks ls\n"
               "\nberth COMMAND --help shows each command's options and an example.")
    p.add_argument("--address", "-a", default=connection.default_address(),
                   help="berthd socket (env BERTH_ADDRESS)")
    p.add_argument("--namespace", "-n", default=connection.default_namespace(),
                   help="namespace (env BERTH_NAMESPACE)")
    p.add_argument("--format", choices=["auto", "table", "json"], default="auto",
                   help="output: tables on a terminal, plain columns otherwise, or json")
    p.add_argument("--debug", action="store_true",
                   help="on failure, print the traceback before the message")
    p.add_argument("--version", action="version", version=f"berth {__version__}")
    sub = p.add_subparsers(dest="group", metavar="COMMAND")
    sub.required = True
    for module in (version, namespaces, plugins, events, leases, images, snapshots, content,
                   run, containers, tasks):
        module.register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    handler: Handler = args.handler
    # Library modules log through structlog; a CLI's stdout is its output, so only
    # warnings and errors are shown, on stderr.
    from berth.core import log

    log.setup("debug" if args.debug else "warn")
    state = _State()
    try:
        return asyncio.run(_run(handler, args, state)) or 0
    except BrokenPipeError:
        # `berth events | head`: the reader left; stop quietly like other Unix tools.
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except (Exception, KeyboardInterrupt, BaseExceptionGroup) as e:
        return _fail(e, args, state)


def _fail(e: BaseException, args: argparse.Namespace, state: _State) -> int:
    """Every failure ends here: one line (a traceback first with ``--debug``)."""
    if args.debug:
        import traceback

        traceback.print_exception(e)
    failure = errors.describe(e, address=args.address, connected=state.connected)
    if failure.message:
        print(f"berth: {failure.message}", file=sys.stderr)
    return failure.exit_code


class _State:
    """What the error path needs to know about the session once it is gone."""

    connected = False


async def _run(handler: Handler, args: argparse.Namespace, state: _State) -> int | None:
    async with connection.connect(args.address, args.namespace) as session:
        try:
            return await handler(args, session)
        finally:
            state.connected = session.connected


def labels_from(args: list[str]) -> dict[str, str]:
    """ctr's `key=value` arguments; a bare key means an empty value."""
    out: dict[str, str] = {}
    for a in args:
        k, _, v = a.partition("=")
        out[k] = v
    return out


def _epilog(example: str) -> dict[str, Any]:
    return {"epilog": f"example:\n  {example}",
            "formatter_class": argparse.RawDescriptionHelpFormatter}


def group(sub: Any, name: str, *, example: str, help: str, aliases: list[str] | None = None
          ) -> argparse.ArgumentParser:
    """A command group (``berth images ...``); its help shows ``example``."""
    p = sub.add_parser(name, help=help, aliases=aliases or [], **_epilog(example))
    EXAMPLES[p.prog] = example
    return p


def add(sub: Any, name: str, handler: Handler, *, example: str, help: str,
        aliases: list[str] | None = None) -> argparse.ArgumentParser:
    """A command; every one shows an example in its help."""
    p = sub.add_parser(name, help=help, aliases=aliases or [], **_epilog(example))
    EXAMPLES[p.prog] = example
    p.set_defaults(handler=handler)
    # Also accepted after the command, as in `berth ns ls --format json`.
    p.add_argument("--format", choices=["auto", "table", "json"], default=argparse.SUPPRESS)
    return p


if __name__ == "__main__":
    sys.exit(main())
