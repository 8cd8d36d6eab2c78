"""Image import + unpack speed of berthd and the real containerd, measured in one run.

Run as root from the repository root::

    python -m benchmarks.bench_import              # ~200 MB image, 3 runs each
    python -m benchmarks.bench_import --quick      # ~24 MB image, 1 run each (smoke)
    python -m benchmarks.bench_import --profile    # also: where berthd's time goes
    python -m benchmarks.bench_import --dir /dev/shm   # roots on tmpfs: no disk

The script first builds an OCI archive (what ``ctr images export`` writes) of a
multi-layer image: each gzip layer holds files copied from ``/usr/lib`` (binaries,
libraries, Python sources: the compressibility of a real distribution image) mixed
with files of random bytes (already-compressed assets), until the layer's compressed
size reaches its share of the target. Then, for each repetition and each daemon in
turn, it starts the daemon on a fresh root, times ``ctr images import ARCHIVE`` (ctr
writes every blob through the Content service, then unpacks layer by layer through
the Snapshots and Diff services), checks that every layer became a committed
snapshot, and stops the daemon. The rate is the archive's size divided by the wall
time of the import; the median of the repetitions is reported, with the daemon's CPU
time (all threads), the steadier number on a busy machine.

On a disk, creating tens of thousands of files is mostly the filesystem's work (and
its journal's, shared with whatever else the machine does): ``--dir /dev/shm`` puts
the archive and both roots on tmpfs, which leaves the daemons' own work to compare.

``--profile`` imports once more into a berthd sampled by py-spy (all threads), splits
the wall time into its two phases using berthd's debug log (blobs written, then
unpack), and prints where the samples fall: content writes, hashing, decompression,
tar parsing, file creation, fsync, the gRPC layer.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import json
import os
import platform
import random
import re
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests import daemons  # noqa: E402

NAME = "bench.local/import:latest"
SOURCE = "/usr/lib"
MTIME = 1704067200
LAYERS = 4
FULL_MB = 200
QUICK_MB = 24
# Share of each layer's bytes (uncompressed) that is random, incompressible data.
RANDOM_SHARE = 0.25
MAX_SOURCE_FILE = 8 << 20
GZIP_LEVEL = 6  # Go's gzip.DefaultCompression, what docker and containerd push with

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"


class BenchError(Exception):
    pass


# -- the image -------------------------------------------------------------------------

def _source_entries(root: str) -> Iterator[tuple[str, os.stat_result]]:
    """Regular files, symlinks and directories under ``root``, in a stable order."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        yield dirpath, os.lstat(dirpath)
        for name in sorted(filenames):
            path = os.path.join(dirpath, name)
            try:
                st = os.lstat(path)
            except OSError:
                continue
            if (os.path.islink(path) or (os.path.isfile(path)
                                         and st.st_size <= MAX_SOURCE_FILE)):
                yield path, st


class _GzipSink:
    """The file a tar stream is written to: hashes it (the diff ID), gzips it into
    ``out`` and hashes that (the blob digest)."""

    def __init__(self, out: Path) -> None:
        self._f = open(out, "wb")  # noqa: SIM115 - closed in finish()
        self._z = zlib.compressobj(GZIP_LEVEL, zlib.DEFLATED, 31)  # gzip, mtime 0
        self.diff_id = hashlib.sha256()
        self.digest = hashlib.sha256()
        self.size = 0
        self.raw = 0

    def write(self, data: bytes) -> int:
        self.diff_id.update(data)
        self.raw += len(data)
        self._out(self._z.compress(data))
        return len(data)

    def _out(self, data: bytes) -> None:
        if data:
            self.digest.update(data)
            self.size += len(data)
            self._f.write(data)

    def finish(self) -> None:
        self._out(self._z.flush())
        self._f.close()


@dataclass
class Layer:
    path: Path
    digest: str
    diff_id: str
    size: int
    raw: int
    files: int


@dataclass
class Archive:
    path: Path
    layers: list[Layer] = field(default_factory=list)

    @property
    def size(self) -> int:
        return self.path.stat().st_size


def _tarinfo(name: str, st: os.stat_result | None = None, **kw: object) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.mtime, info.uid, info.gid = MTIME, 0, 0
    if st is not None:
        info.mode = st.st_mode & 0o7777
    for k, v in kw.items():
        setattr(info, k, v)
    return info


def _write_layer(index: int, dest: Path, budget: int, source: Iterator[tuple[str,
                 os.stat_result]], rng: random.Random) -> Layer:
    sink = _GzipSink(dest)
    files = 0
    random_due = 0.0
    with tarfile.open(fileobj=sink, mode="w|", format=tarfile.PAX_FORMAT) as tar:  # type: ignore[call-overload]
        tar.addfile(_tarinfo(f"data{index}/", type=tarfile.DIRTYPE, mode=0o755))
        while sink.size < budget:
            try:
                path, st = next(source)
            except StopIteration:
                raise BenchError(f"{SOURCE} holds too little to fill the image") from None
            name = f"layer{index}" + path
            if os.path.islink(path):
                tar.addfile(_tarinfo(name, st, type=tarfile.SYMTYPE,
                                     linkname=os.readlink(path)))
            elif os.path.isdir(path):
                tar.addfile(_tarinfo(name + "/", st, type=tarfile.DIRTYPE))
            else:
                try:
                    with open(path, "rb") as f:
                        data = f.read(MAX_SOURCE_FILE + 1)
                except OSError:
                    continue
                tar.addfile(_tarinfo(name, st, size=len(data)), _Bytes(data))
                random_due += len(data) * RANDOM_SHARE / (1 - RANDOM_SHARE)
            files += 1
            # Random files of 4 KiB .. 2 MiB keep up with the copied bytes.
            while random_due > 0:
                n = min(int(random_due) + 1, rng.choice((4 << 10, 64 << 10, 512 << 10,
                                                        2 << 20)))
                tar.addfile(_tarinfo(f"data{index}/r{files:06d}-{n}", size=n,
                                     mode=0o644), _Bytes(rng.randbytes(n)))
                random_due -= n
                files += 1
    sink.finish()
    return Layer(dest, "sha256:" + sink.digest.hexdigest(),
                 "sha256:" + sink.diff_id.hexdigest(), sink.size, sink.raw, files)


class _Bytes:
    """A minimal file object over bytes for tarfile.addfile (no BytesIO copy)."""

    def __init__(self, data: bytes) -> None:
        self._view = memoryview(data)
        self._pos = 0

    def read(self, n: int = -1) -> bytes:
        end = len(self._view) if n < 0 else self._pos + n
        out = self._view[self._pos:end]
        self._pos += len(out)
        return bytes(out)


def _json(doc: object) -> bytes:
    return json.dumps(doc, separators=(",", ":")).encode()


def build_archive(dest: Path, total_mb: int, layers: int = LAYERS) -> Archive:
    """An OCI layout tar of a ``layers``-layer image whose blobs add up to ~total_mb."""
    work = dest.parent / (dest.name + ".blobs")
    work.mkdir()
    rng = random.Random(20240601)
    source = _source_entries(SOURCE)
    budget = total_mb * 1_000_000 // layers
    archive = Archive(dest)
    for i in range(layers):
        archive.layers.append(_write_layer(i, work / f"layer{i}", budget, source, rng))
    arch = {"x86_64": "amd64", "aarch64": "arm64"}.get(platform.machine(), platform.machine())
    config = _json({
        "architecture": arch, "os": "linux", "created": "2024-01-01T00:00:00Z",
        "config": {"Cmd": ["/bin/sh"]},
        "rootfs": {"type": "layers", "diff_ids": [la.diff_id for la in archive.layers]},
    })
    manifest = _json({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": _sha(config), "size": len(config)},
        "layers": [{"mediaType": OCI_LAYER_GZIP, "digest": la.digest, "size": la.size}
                   for la in archive.layers],
    })
    index = _json({
        "schemaVersion": 2, "mediaType": OCI_INDEX,
        "manifests": [{"mediaType": OCI_MANIFEST, "digest": _sha(manifest),
                       "size": len(manifest),
                       "annotations": {"io.containerd.image.name": NAME,
                                       "org.opencontainers.image.ref.name": "latest"}}],
    })
    with tarfile.open(dest, "w", format=tarfile.PAX_FORMAT) as tar:
        tar.addfile(_tarinfo("blobs/", type=tarfile.DIRTYPE, mode=0o755))
        tar.addfile(_tarinfo("blobs/sha256/", type=tarfile.DIRTYPE, mode=0o755))
        for data in (config, manifest):
            tar.addfile(_tarinfo(f"blobs/sha256/{_sha(data)[7:]}", size=len(data),
                                 mode=0o444), _Bytes(data))
        for la in archive.layers:
            with open(la.path, "rb") as f:
                tar.addfile(_tarinfo(f"blobs/sha256/{la.digest[7:]}", size=la.size,
                                     mode=0o444), f)
        tar.addfile(_tarinfo("index.json", size=len(index), mode=0o644), _Bytes(index))
        layout = b'{"imageLayoutVersion":"1.0.0"}'
        tar.addfile(_tarinfo("oci-layout", size=len(layout), mode=0o644), _Bytes(layout))
    shutil.rmtree(work)
    return archive


def _sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


# -- daemons and one import ------------------------------------------------------------

def start_containerd(base: Path, level: str) -> daemons.Daemon:
    d = daemons.containerd(base)
    cfg = base / "config.toml"
    # Same log level as berthd, so neither pays for debug output the other skips.
    cfg.write_text(re.sub(r'(?m)^(\s*level\s*=\s*)"\w+"', rf'\1"{level}"', cfg.read_text()))
    return d.start()


def start_berthd(base: Path, level: str) -> daemons.Daemon:
    return daemons.berthd(base, "--log-level", level).start()


STARTERS = {"containerd": start_containerd, "berth": start_berthd}


@dataclass
class Run:
    daemon: str
    seconds: float
    cpu: float  # daemon CPU seconds (all threads) during the import
    log: str = ""
    started: float = 0.0  # wall clock (time.time()) when the import began

    def rate(self, size: int) -> float:
        return size / 1e6 / self.seconds


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    clk = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / clk


def check_unpacked(d: daemons.Daemon, archive: Archive) -> None:
    r = daemons.ctr(d.address, "snapshots", "ls")
    committed = [line for line in r.out.splitlines()[1:] if line.split()[-1] == "Committed"]
    if r.rc != 0 or len(committed) != len(archive.layers):
        raise BenchError(f"{d.name}: expected {len(archive.layers)} committed snapshots, "
                         f"got:\n{r.out}{r.err}")
    r = daemons.ctr(d.address, "images", "ls", "-q")
    if r.out.split() != [NAME]:
        raise BenchError(f"{d.name}: image not recorded: {r.out}{r.err}")


def import_once(name: str, base: Path, archive: Archive, level: str,
                profile: Path | None = None) -> Run:
    d = STARTERS[name](base, level)
    spy = None
    try:
        assert d.proc is not None
        if profile is not None:
            spy = subprocess.Popen(
                [_py_spy(), "record", "--pid", str(d.proc.pid), "--rate", "250",
                 "--format", "raw", "--output", str(profile), "--nonblocking"],
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            time.sleep(1.0)  # py-spy attaches before the work starts
        # Write back what earlier runs left dirty (and the archive), so that no run
        # pays for another's writeback.
        os.sync()
        cpu0 = cpu_seconds(d.proc.pid)
        started = time.time()
        t0 = time.monotonic()
        r = daemons.ctr(d.address, "images", "import", str(archive.path), timeout=1800)
        wall = time.monotonic() - t0
        cpu = cpu_seconds(d.proc.pid) - cpu0
        if r.rc != 0:
            raise BenchError(f"{name}: ctr images import failed: {r.err}\n"
                             f"{d.logs()[-3000:]}")
        check_unpacked(d, archive)
        return Run(name, wall, cpu, d.logs() if profile is not None else "", started)
    finally:
        if spy is not None:
            spy.send_signal(2)  # SIGINT: py-spy writes what it has and exits
            try:
                spy.wait(60)
            except subprocess.TimeoutExpired:
                spy.kill()
                spy.wait()
        d.stop()
        shutil.rmtree(base, ignore_errors=True)
        os.sync()


def _py_spy() -> str:
    found = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not os.access(found, os.X_OK):
        raise BenchError("py-spy is missing: pip install py-spy (the project's test extra)")
    return found


# -- the profile -----------------------------------------------------------------------

# Frames that name a stage of the import, checked innermost first.
STAGES = [
    ("fsync", ("fsync",)),
    ("sha256 (content)", ("_write_sync (core/content", "_commit_sync", "rehash")),
    ("gzip inflate", ("compression.py",)),
    ("sha256 of the layer (diff ID) and blob check", ("_produce", "_VerifyingReader")),
    ("tar parsing", ("tarfile.py", "tarheader.py")),
    ("file data writes", ("_file (plugins/differ", "_copy_data")),
    ("entry metadata (chown/chmod/utime/xattr)", ("_meta", "_set_times", "_xattrs")),
    ("other apply (dirs, links, planning)", ("plugins/differ",)),
    ("content service / writer", ("core/content", "core/metadata/content",
                                  "services/content")),
    ("snapshots", ("snapshotters", "metadata/snapshots")),
    ("gRPC / HTTP2 (grpclib, h2, bridge)", ("grpclib", "/h2/", "hpack", "core/grpc",
                                             "betterproto")),
    ("event loops (trio, asyncio)", ("trio", "asyncio")),
]


def summarize_profile(path: Path) -> str:
    """Per-stage and per-function shares of py-spy's raw (collapsed) samples."""
    stages: collections.Counter[str] = collections.Counter()
    leaves: collections.Counter[str] = collections.Counter()
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        n = int(count)
        frames = stack.split(";")
        total += n
        leaves[frames[-1]] += n
        stage = "other"
        for frame in reversed(frames):
            hit = next((s for s, keys in STAGES if any(k in frame for k in keys)), None)
            if hit is not None:
                stage = hit
                break
        stages[stage] += n
    if not total:
        return "profile: no samples"
    lines = [f"berthd samples by stage ({total} samples, all threads, idle excluded):"]
    lines += [f"  {n / total:6.1%}  {s}" for s, n in stages.most_common()]
    lines.append("top functions by own samples:")
    lines += [f"  {n / total:6.1%}  {f}" for f, n in leaves.most_common(15)]
    return "\n".join(lines)


def phases(log: str, started: float) -> tuple[float, float]:
    """From a debug berthd log: seconds from ``started`` (wall clock) to the first
    snapshot prepared (every blob is written by then), and the total of the differ's
    per-layer "diff applied" durations."""
    content = applied = 0.0
    for line in log.splitlines():
        if not line.startswith("{"):
            continue
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if event.get("event") == "diff applied":
            m = re.fullmatch(r"([\d.]+)s", event.get("d", ""))
            applied += float(m.group(1)) if m else 0.0
        elif not content and event.get("topic") == "/snapshot/prepare":
            stamp = datetime.fromisoformat(event["timestamp"].replace("Z", "+00:00"))
            content = stamp.timestamp() - started
    return content, applied


# -- main ------------------------------------------------------------------------------

def environment() -> str:
    model = "?"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    ver = subprocess.run([daemons.CONTAINERD, "--version"], capture_output=True,
                         text=True).stdout.strip()
    return (f"cpus: {os.cpu_count()} x {model}; kernel {platform.release()}; "
            f"python {platform.python_version()}\ncontainerd: {ver}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench_import", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true",
                   help=f"smoke run: ~{QUICK_MB} MB image, one import per daemon")
    p.add_argument("--size-mb", type=int, default=None,
                   help=f"compressed image size (default {FULL_MB}, quick {QUICK_MB})")
    p.add_argument("--repeat", type=int, default=3, help="imports per daemon (median shown)")
    p.add_argument("--log-level", default="info", help="log level of both daemons")
    p.add_argument("--profile", action="store_true",
                   help="one more berthd import under py-spy; print where time goes")
    p.add_argument("--only", choices=sorted(STARTERS), help="measure one daemon only")
    p.add_argument("--dir", default="/tmp",
                   help="where the archive and the daemons' roots go (e.g. /dev/shm to "
                        "take the disk out of the comparison)")
    args = p.parse_args(argv)
    if os.geteuid() != 0:
        print("bench_import: must run as root (both daemons mount overlays)", file=sys.stderr)
        return 2
    size_mb = args.size_mb or (QUICK_MB if args.quick else FULL_MB)
    repeat = 1 if args.quick else max(1, args.repeat)
    names = [args.only] if args.only else ["containerd", "berth"]

    base = Path(tempfile.mkdtemp(prefix="berth-bimp-", dir=args.dir))
    try:
        print(environment())
        t0 = time.monotonic()
        archive = build_archive(base / "image.tar", size_mb)
        raw = sum(la.raw for la in archive.layers)
        files = sum(la.files for la in archive.layers)
        print(f"image: {len(archive.layers)} gzip layers, {files} entries, archive "
              f"{archive.size / 1e6:.1f} MB ({raw / 1e6:.1f} MB uncompressed); built in "
              f"{time.monotonic() - t0:.1f}s", flush=True)
        print(f"{'quick' if args.quick else 'full'} run; median of {repeat}; "
              f"log level {args.log_level}", flush=True)
        runs: dict[str, list[Run]] = {n: [] for n in names}
        for i in range(repeat):
            # Interleaved, so drift hits both alike, and in turns: on a disk, whoever
            # runs right after the other pays for some of its writeback.
            for name in (names if i % 2 == 0 else names[::-1]):
                run = import_once(name, base / f"{name}{i}", archive, args.log_level)
                runs[name].append(run)
                print(f"  {name:<10} run {i + 1}: {run.seconds:6.2f}s  "
                      f"{run.rate(archive.size):7.1f} MB/s  daemon cpu {run.cpu:.1f}s",
                      flush=True)
        rates = {}
        for name in names:
            secs = statistics.median(r.seconds for r in runs[name])
            cpu = statistics.median(r.cpu for r in runs[name])
            rates[name] = archive.size / 1e6 / secs
            # CPU seconds are the steadier number on a busy machine.
            print(f"{name} import+unpack: {rates[name]:.1f} MB/s (median {secs:.2f}s, "
                  f"daemon cpu {cpu:.2f}s)")
        if len(rates) == 2:
            print(f"ratio berth/containerd: {rates['berth'] / rates['containerd']:.2f}")
        if args.profile:
            prof = base / "berth.profile.txt"
            run = import_once("berth", base / "profiled", archive, "debug", profile=prof)
            print(f"\nprofiled berth import (py-spy attached, debug log): "
                  f"{run.seconds:.2f}s, daemon cpu {run.cpu:.1f}s")
            content, applied = phases(run.log, run.started)
            print(f"phases (from berthd's log): blobs written (ctr -> Content.Write) "
                  f"{content:.2f}s, then unpack {run.seconds - content:.2f}s of which "
                  f"Diff.Apply {applied:.2f}s")
            print(summarize_profile(prof))
    except BenchError as e:
        print(f"bench_import: {e}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
