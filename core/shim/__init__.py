"""``containerd-shim-berth-v1``: berth's shim for the runtime ``io.containerd.berth.v1``.

Modules: ``flags`` (Go-style command line), ``address`` (socket paths and grouping),
``start`` and ``zygote`` (the start action and the warm forking parent), ``delete``
(cleanup of a dead shim), ``serve`` (the long-running shim), ``service`` (the ttrpc
Task API), ``process`` (init and exec processes), ``stdio`` (FIFOs, files, logging
binaries, ptys), ``publisher`` (events to the daemon), ``options`` (runtime choice),
``oom``, ``metrics``, ``host``, ``wire`` and ``logging``.

``main`` imports only what the chosen action needs: ``start`` and ``delete`` run once
per container on containerd's critical path.
"""

from __future__ import annotations

import os
import sys

NAME = "containerd-shim-berth-v1"
VERSION_TEXT = "{argv0}:\n  Version:  {version}\n  Revision: berth\n  Python:   {python}\n"


def main(argv: list[str] | None = None) -> int:
    from berth.core.shim import flags as shim_flags

    args = sys.argv[1:] if argv is None else argv
    try:
        flags = shim_flags.parse(args)
    except shim_flags.UsageError as exc:
        sys.stderr.write(f"{exc}\n")
        return 2
    if flags.version:
        from berth.core import __version__

        sys.stdout.write(VERSION_TEXT.format(argv0=sys.argv[0], version=__version__,
                                             python=sys.version.split()[0]) + "\n")
        return 0
    if not flags.namespace:
        sys.stderr.write(f"{NAME}: shim namespace cannot be empty")
        return 1
    try:
        if flags.action == "start":
            from berth.core.shim import start

            address = start.start(flags, start.read_stdin(),
                                  use_zygote=os.environ.get("BERTH_SHIM_ZYGOTE", "1") != "0")
            sys.stdout.write(address)
            sys.stdout.flush()
            if argv is None:
                # Run as the program: the caller waits for this exit, and tearing the
                # interpreter down costs milliseconds of each container's start.
                sys.stderr.flush()
                os._exit(0)
            return 0
        if flags.action == "delete":
            from berth.core.shim import delete

            data, warnings = delete.delete(flags)
            for warning in warnings:
                sys.stderr.write(warning + "\n")
            sys.stdout.buffer.write(data)
            sys.stdout.flush()
            return 0
        if flags.action:
            sys.stderr.write(f"{NAME}: unknown action {flags.action!r}")
            return 1
        return _serve_inherited(flags)
    except Exception as exc:  # noqa: BLE001 - containerd shows this text to the user
        sys.stderr.write(f"{NAME}: {exc}")
        return 1


def _serve_inherited(flags) -> int:
    """Serve mode when exec'd like a Go shim: the socket is fd 3, or ``-socket`` path."""
    import socket

    from berth.core.shim import address as addr, serve

    if flags.socket:
        listener = addr.listen("unix://" + flags.socket.removeprefix("unix://"))
        if listener is None:
            raise RuntimeError(f"{flags.socket}: a shim already serves this socket")
    else:
        listener = socket.socket(fileno=3)
    return serve.run(flags, listener)
