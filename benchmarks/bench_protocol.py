"""CPU cost of berth's gRPC serving path per unary call, without sockets or daemons.

A client h2 connection (in this process) makes the request bytes; they are fed straight
into ``connection.Connection.feed`` in batches (1 request per read, like one caller;
16 per read, like many), and the server's answers are fed back to the client, which
checks them and hands flow-control windows back. So this measures berth's own work
(h2, the connection's events, the service, betterproto) with no kernel, no socket and
no other process: stable even on a busy machine, and handy with a profiler::

    python -m benchmarks.bench_protocol [--calls N] [--batch B] [--ping]
    py-spy record -o prof.svg -- python -m benchmarks.bench_protocol
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import h2.config
import h2.connection
import h2.events
import trio

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from berth.core import log as logsetup  # noqa: E402
from berth.core.api.containerd.services.namespaces.v1 import (  # noqa: E402
    ListNamespacesResponse,
    Namespace,
    NamespacesBase,
)
from berth.core.api.containerd.services.version.v1 import VersionBase, VersionResponse  # noqa: E402
from berth.core.grpc import bridge, connection  # noqa: E402

VERSION = "/containerd.services.version.v1.Version/Version"
LIST = "/containerd.services.namespaces.v1.Namespaces/List"


class _Version:
    base = VersionBase

    def __init__(self) -> None:
        self._resp = VersionResponse(version="0.1.0", revision="berth")

    def version(self, ctx: Any, req: Any) -> VersionResponse:
        return self._resp


class _Namespaces:
    """Like the real service, minus sqlite: builds a fresh answer every call."""

    base = NamespacesBase

    def list(self, ctx: Any, req: Any) -> ListNamespacesResponse:
        return ListNamespacesResponse([Namespace(name=f"bench-{c}", labels={"purpose": "x"})
                                       for c in "abcd"])


async def run(path: str, calls: int, batch: int, ping: bool = False) -> float:
    routes = {**bridge.handlers_for(_Version(), VersionBase),
              **bridge.handlers_for(_Namespaces(), NamespacesBase)}
    conn = connection.Connection(connection.Router(routes))

    client = h2.connection.H2Connection(
        h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
    client.initiate_connection()
    headers = [(":method", "POST"), (":scheme", "http"), (":path", path),
               (":authority", "localhost"), ("content-type", "application/grpc"),
               ("te", "trailers"), ("containerd-namespace", "bench-a")]
    body = b"\x00\x00\x00\x00\x00"
    done = acks = 0

    async def exchange(n: int) -> float:
        nonlocal done, acks
        for _ in range(n):
            if ping:
                client.ping(b"bdp-ping")  # as grpc-go does before nearly every call
            sid = client.get_next_available_stream_id()
            client.send_headers(sid, headers)
            client.send_data(sid, body, end_stream=True)
        data = client.data_to_send()
        t0 = time.process_time()
        conn.feed(data)
        out = conn.data_to_send()
        spent = time.process_time() - t0
        for ev in client.receive_data(out):
            if isinstance(ev, h2.events.TrailersReceived):
                status = dict(ev.headers).get("grpc-status")
                if status != "0":
                    raise RuntimeError(f"call failed: {ev.headers}")
                done += 1
            elif isinstance(ev, h2.events.DataReceived):
                client.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
            elif isinstance(ev, h2.events.PingAckReceived):
                acks += 1
        return spent

    # The server's preface and SETTINGS, then the client's ack of them.
    conn.feed(client.data_to_send())
    client.receive_data(conn.data_to_send())
    await exchange(batch)  # warm up: first headers fill the HPACK tables
    done = acks = 0
    spent = 0.0
    for _ in range(calls // batch):
        spent += await exchange(batch)
    if done != calls // batch * batch or (ping and acks != done):
        raise RuntimeError(f"{done} answers ({acks} PING ACKs) for {calls // batch * batch} "
                           "calls")
    return spent / done


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench_protocol", description=__doc__.split("\n")[0])
    p.add_argument("--calls", type=int, default=20000)
    p.add_argument("--batch", type=int, nargs="*", default=[1, 16])
    p.add_argument("--ping", action="store_true",
                   help="a PING before every call, as grpc-go clients (ctr, dockerd) send")
    args = p.parse_args(argv)
    logsetup.setup("warn")
    print(f"{'method':<16} {'requests/read':>13} {'us/call':>8} {'calls/s/core':>13}")
    for name, path in (("Version", VERSION), ("Namespaces.List", LIST)):
        for batch in args.batch:
            per_call = trio.run(run, path, args.calls, batch, args.ping)
            print(f"{name:<16} {batch:>13} {per_call * 1e6:>8.1f} {1 / per_call:>13.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
