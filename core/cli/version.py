"""`berth version`."""

from __future__ import annotations

import argparse
from typing import Any

from betterproto.lib.google.protobuf import Empty

from berth.core import __version__
from berth.core.cli import app
from berth.core.cli.output import emit
from berth.core.client import connection


async def version(args: argparse.Namespace, s: connection.Session) -> int:
    from berth.core.api.containerd.services.introspection.v1 import IntrospectionStub
    from berth.core.api.containerd.services.version.v1 import VersionStub

    if args.format != "json":
        # As ctr: the client's part comes first, so it shows when the daemon is not there.
        print("Client:")
        print("  Version: ", __version__)
        print(flush=True)
    try:
        v = await VersionStub(s.channel).version(Empty())
        info = await IntrospectionStub(s.channel).server(Empty())
    except BaseException:
        if args.format == "json":
            emit([], [], fmt="json", records=[{"client": {"version": __version__},
                                               "server": None}])
        raise
    if args.format == "json":
        emit([], [], fmt="json", records=[{
            "client": {"version": __version__},
            "server": {"version": v.version, "revision": v.revision, "uuid": info.uuid},
        }])
        return 0
    print("Server:")
    print("  Version: ", v.version)
    print("  Revision:", v.revision)
    print("  UUID:", info.uuid)
    return 0


def register(sub: Any) -> None:
    app.add(sub, "version", version, example="berth version",
            help="print client and server versions")
