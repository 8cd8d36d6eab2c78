"""Unary gRPC throughput of berthd and the real containerd, measured in one run.

Run as root from the repository root::

    python -m benchmarks.bench_unary            # full run (about two minutes)
    python -m benchmarks.bench_unary --quick    # smoke run (seconds)

Both daemons start in a temporary folder and are stopped (and the folder removed) at
the end. The load generator is ``h2load`` (nghttp2, written in C), connected straight to
each daemon's unix socket (``-B unix:PATH``): a Python gRPC client saturates long before
containerd does, so it would measure itself. Python (grpclib) is used only to prepare
the daemons (namespaces) and to make one checked call per method whose exact answer
length is then required of every h2load response: h2load counts any HTTP 200 as a
success, and a gRPC error is an HTTP 200 without a DATA frame, so "data bytes received ==
requests x good answer length" proves every counted call succeeded.

Caller shapes: "1 caller" is one connection with one stream at a time (pure latency).
"16 callers" is 4 connections x 4 concurrent streams: a daemon typically serves a few
clients (dockerd, a CRI adapter, ctr invocations), each a grpc-go connection that
multiplexes its goroutines' calls as concurrent streams.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from berth.core.api.containerd.services.namespaces.v1 import (  # noqa: E402
    CreateNamespaceRequest,
    ListNamespacesRequest,
    ListNamespacesResponse,
    Namespace,
)
from berth.core.api.containerd.services.version.v1 import VersionResponse  # noqa: E402
from tests import daemons  # noqa: E402

H2LOAD = "h2load"
NAMESPACE = "bench-a"
NAMESPACES = ("bench-a", "bench-b", "bench-c", "bench-d")
CLK_TCK = os.sysconf("SC_CLK_TCK")


class BenchError(Exception):
    pass


@dataclass(frozen=True)
class Method:
    name: str
    path: str
    request: bytes
    check: Callable[[bytes], None]


def _check_version(raw: bytes) -> None:
    resp = VersionResponse().parse(raw)
    if not resp.version:
        raise BenchError(f"Version answered without a version: {resp!r}")


def _check_namespaces(raw: bytes) -> None:
    names = {ns.name for ns in ListNamespacesResponse().parse(raw).namespaces}
    missing = set(NAMESPACES) - names
    if missing:
        raise BenchError(f"Namespaces.List misses {sorted(missing)}: got {sorted(names)}")


METHODS = (
    Method("Version", "/containerd.services.version.v1.Version/Version", b"",
           _check_version),
    Method("Namespaces.List", "/containerd.services.namespaces.v1.Namespaces/List",
           bytes(ListNamespacesRequest()), _check_namespaces),
)


@dataclass(frozen=True)
class Shape:
    """How h2load spreads the callers: connections x concurrent streams, threads."""

    conns: int
    streams: int
    threads: int = 1

    @property
    def callers(self) -> int:
        return self.conns * self.streams

    def __str__(self) -> str:
        return f"-c{self.conns} -m{self.streams} -t{self.threads}"


SHAPES = (Shape(1, 1), Shape(4, 4))
# The generator probe: the 16-caller shape with a second h2load thread (if h2load were
# the bottleneck, this would serve more), then more calls in flight, up to where a
# daemon is busy all the time: each daemon's ceiling, whatever the callers.
PROBE_SHAPES = (Shape(4, 4), Shape(4, 4, 2), Shape(1, 16), Shape(4, 16), Shape(8, 16, 2))


def frame(message: bytes) -> bytes:
    """A gRPC length-prefixed message (uncompressed)."""
    return b"\x00" + len(message).to_bytes(4, "big") + message


# -- a one-shot checked client (grpclib), used outside the measured runs ---------------

class _Raw:
    """Bytes passed through grpclib's proto codec untouched."""

    def __init__(self, data: bytes = b"") -> None:
        self.data = data

    def SerializeToString(self) -> bytes:  # noqa: N802 - the codec's protocol
        return self.data

    @classmethod
    def FromString(cls, data: bytes) -> _Raw:  # noqa: N802
        return cls(data)


async def _acall(sock: Path, path: str, request: bytes) -> bytes:
    from grpclib.client import Channel
    from grpclib.const import Cardinality

    channel = Channel(path=str(sock))
    try:
        async with channel.request(path, Cardinality.UNARY_UNARY, _Raw, _Raw,
                                   metadata={"containerd-namespace": NAMESPACE},
                                   timeout=10) as stream:
            await stream.send_message(_Raw(request), end=True)
            reply = await stream.recv_message()
            await stream.recv_trailing_metadata()  # raises GRPCError unless OK
    finally:
        channel.close()
    if reply is None:
        raise BenchError(f"{path}: no answer message")
    return reply.data


def call(sock: Path, path: str, request: bytes) -> bytes:
    return asyncio.run(_acall(sock, path, request))


# -- daemons ---------------------------------------------------------------------------

@dataclass
class Target:
    name: str
    daemon: daemons.Daemon
    expected: dict[str, int]  # method name -> length of a good answer's DATA

    @property
    def pid(self) -> int:
        assert self.daemon.proc is not None
        return self.daemon.proc.pid

    @property
    def sock(self) -> Path:
        return self.daemon.address


def start_containerd(base: Path, level: str) -> daemons.Daemon:
    d = daemons.containerd(base)
    cfg = base / "config.toml"
    # Same log level as berthd, so neither pays for debug output the other skips.
    cfg.write_text(re.sub(r'(?m)^(\s*level\s*=\s*)"\w+"', rf'\1"{level}"', cfg.read_text()))
    return d.start()


def start_berthd(base: Path, level: str) -> daemons.Daemon:
    return daemons.berthd(base, "--log-level", level).start()


def prepare(target: Target) -> None:
    """Create the namespaces, then record the exact good answer of every method."""
    create = "/containerd.services.namespaces.v1.Namespaces/Create"
    for ns in NAMESPACES:
        req = CreateNamespaceRequest(Namespace(name=ns, labels={"purpose": "benchmark"}))
        call(target.sock, create, bytes(req))
    for m in METHODS:
        raw = call(target.sock, m.path, m.request)
        m.check(raw)
        target.expected[m.name] = len(frame(raw))


# -- measuring -------------------------------------------------------------------------

def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all its threads)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


@dataclass
class Run:
    target: str
    method: str
    shape: Shape
    requests: int
    rate: float  # calls/s as h2load measured them
    daemon_cpu: float  # percent of one CPU, over the run
    h2load_cpu: float
    cpu_per_call: float  # daemon CPU time per call, microseconds


_RE_FINISHED = re.compile(r"finished in [\d.]+\w+, ([\d.]+) req/s")
_RE_REQUESTS = re.compile(
    r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, "
    r"(\d+) errored, (\d+) timeout")
_RE_STATUS = re.compile(r"status codes: (\d+) 2xx")
_RE_DATA = re.compile(r"\((\d+)\) data")


def h2load(target: Target, method: Method, shape: Shape, n: int, body: Path) -> Run:
    argv = [
        H2LOAD, "-B", f"unix:{target.sock}", "-n", str(n), "-c", str(shape.conns),
        "-m", str(shape.streams), "-t", str(shape.threads), "-d", str(body),
        "-H", "content-type: application/grpc", "-H", "te: trailers",
        "-H", f"containerd-namespace: {NAMESPACE}",
        f"http://localhost{method.path}",
    ]
    children_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_before = cpu_seconds(target.pid)
    t0 = time.monotonic()
    p = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    wall = time.monotonic() - t0
    cpu_after = cpu_seconds(target.pid)
    children_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = p.stdout + p.stderr
    finished, reqs = _RE_FINISHED.search(out), _RE_REQUESTS.search(out)
    status, data = _RE_STATUS.search(out), _RE_DATA.search(out)
    if p.returncode != 0 or not (finished and reqs and status and data):
        raise BenchError(f"h2load failed ({p.returncode}):\n{out}")
    total, _, done, ok, failed, errored, timeout = map(int, reqs.groups())
    expected = target.expected[method.name]
    if (total, done, ok, int(status.group(1))) != (n, n, n, n) or failed or errored or timeout:
        raise BenchError(f"{target.name} {method.name}: not every call succeeded:\n{out}")
    if int(data.group(1)) != n * expected:
        raise BenchError(
            f"{target.name} {method.name}: {data.group(1)} answer bytes for {n} calls, "
            f"expected {n * expected} ({expected} each): some calls did not succeed:\n{out}")
    h2cpu = (children_after.ru_utime + children_after.ru_stime
             - children_before.ru_utime - children_before.ru_stime)
    cpu = cpu_after - cpu_before
    return Run(target.name, method.name, shape, n, float(finished.group(1)),
               100 * cpu / wall, 100 * h2cpu / wall, 1e6 * cpu / n)


def measure(target: Target, method: Method, shape: Shape, body: Path, *, seconds: float,
            quick: bool) -> Run:
    if quick:
        return h2load(target, method, shape, 200, body)
    # A short run warms the daemon up and tells how many calls fill `seconds`.
    probe = h2load(target, method, shape, 500 * shape.callers, body)
    n = max(1000, int(probe.rate * seconds) // shape.callers * shape.callers)
    return h2load(target, method, shape, n, body)


def median_run(runs: list[Run]) -> Run:
    return sorted(runs, key=lambda r: r.rate)[len(runs) // 2]


# -- report ----------------------------------------------------------------------------

def environment() -> str:
    def version(argv: list[str]) -> str:
        try:
            out = subprocess.run(argv, capture_output=True, text=True, timeout=10).stdout
        except OSError as e:
            return f"? ({e})"
        return out.strip().splitlines()[0] if out.strip() else "?"

    model = "?"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return "\n".join([
        f"cpus: {os.cpu_count()} x {model}; kernel {platform.release()}",
        f"containerd: {version([daemons.CONTAINERD, '--version'])}",
        f"h2load: {version([H2LOAD, '--version'])}; python {platform.python_version()}",
    ])


def table(runs: dict[tuple[str, str, Shape], Run], expected: dict[str, dict[str, int]]
          ) -> str:
    head = (f"{'method':<16} {'callers':>7} {'containerd/s':>13} {'berth/s':>9} "
            f"{'berth/containerd':>16}  {'cpu us/call c/b':>16}  {'cpu% c/b':>9}  "
            f"{'h2load cpu% c/b':>15}")
    lines = [head, "-" * len(head)]
    for m in METHODS:
        for shape in SHAPES:
            c = runs[("containerd", m.name, shape)]
            b = runs[("berth", m.name, shape)]
            lines.append(
                f"{m.name:<16} {shape.callers:>7} {c.rate:>13.0f} {b.rate:>9.0f} "
                f"{b.rate / c.rate:>16.3f}  {f'{c.cpu_per_call:.0f}/{b.cpu_per_call:.0f}':>16}"
                f"  {f'{c.daemon_cpu:.0f}/{b.daemon_cpu:.0f}':>9}"
                f"  {f'{c.h2load_cpu:.0f}/{b.h2load_cpu:.0f}':>15}")
    lines.append("")
    lines.append("answer sizes (bytes of DATA per call): " + "; ".join(
        f"{t} {m}={n}" for t, per in expected.items() for m, n in per.items()))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench_unary", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke run: 200 calls per cell")
    p.add_argument("--seconds", type=float, default=3.0, help="target length of each run")
    p.add_argument("--repeat", type=int, default=3, help="runs per cell (median is shown)")
    p.add_argument("--log-level", default="warn", help="log level of both daemons")
    p.add_argument("--no-probe", action="store_true", help="skip the generator probe")
    args = p.parse_args(argv)
    if os.geteuid() != 0:
        print("bench_unary: must run as root (containerd needs it)", file=sys.stderr)
        return 2
    if shutil.which(H2LOAD) is None:
        print("bench_unary: h2load is missing: install Debian package nghttp2-client",
              file=sys.stderr)
        return 2
    repeat = 1 if args.quick else max(1, args.repeat)

    base = Path(tempfile.mkdtemp(prefix="berth-bench-", dir="/tmp"))
    started: list[daemons.Daemon] = []
    try:
        print(environment())
        print(f"workdir: {base} (removed at the end)")
        print(f"log level: {args.log_level}; {'quick' if args.quick else 'full'} run; "
              f"median of {repeat}", flush=True)
        ctd = start_containerd(base / "containerd", args.log_level)
        started.append(ctd)
        berth = start_berthd(base / "berth", args.log_level)
        started.append(berth)
        targets = [Target("containerd", ctd, {}), Target("berth", berth, {})]
        for t in targets:
            prepare(t)
        body = base / "request.bin"
        runs: dict[tuple[str, str, Shape], Run] = {}
        for m in METHODS:
            body.write_bytes(frame(m.request))
            for shape in SHAPES:
                got: dict[str, list[Run]] = {t.name: [] for t in targets}
                for _ in range(repeat):  # interleaved, so drift hits both alike
                    for t in targets:
                        got[t.name].append(measure(t, m, shape, body, seconds=args.seconds,
                                                   quick=args.quick))
                for t in targets:
                    r = runs[(t.name, m.name, shape)] = median_run(got[t.name])
                    rates = ", ".join(f"{x.rate:.0f}" for x in got[t.name])
                    print(f"  {t.name:<10} {m.name:<16} {shape.callers:>2} callers ({shape}): "
                          f"{r.rate:9.0f} calls/s [{rates}]  cpu {r.daemon_cpu:.0f}% "
                          f"({r.cpu_per_call:.0f} us/call)  h2load cpu {r.h2load_cpu:.0f}%",
                          flush=True)
        print()
        print(table(runs, {t.name: t.expected for t in targets}))
        if not args.quick and not args.no_probe:
            print()
            print("generator probe (Version): the same calls with more h2load threads and "
                  "more calls in flight")
            body.write_bytes(frame(METHODS[0].request))
            for shape in PROBE_SHAPES:
                got = {t.name: [] for t in targets}
                for _ in range(repeat):
                    for t in targets:
                        got[t.name].append(measure(t, METHODS[0], shape, body,
                                                   seconds=args.seconds, quick=False))
                print(f"  {shape.callers:>3} in flight ({shape}):" + "".join(
                    f"  {name} {r.rate:6.0f} calls/s (cpu {r.daemon_cpu:3.0f}%, h2load "
                    f"{r.h2load_cpu:2.0f}%)" for name, r in
                    ((name, median_run(rs)) for name, rs in got.items())), flush=True)
    except BenchError as e:
        print(f"bench_unary: {e}", file=sys.stderr)
        for d in started:
            print(f"--- {d.name} log (tail) ---\n{d.logs()[-3000:]}", file=sys.stderr)
        return 1
    finally:
        for d in started:
            d.stop()
        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
