"""On-disk layout of an ingest (an unfinished write), as plain blocking functions.

The layout follows containerd's local store so the same files mean the same things::

    ingest/<sha256(ref) hex>/ref        the client's ref, verbatim
                             data       the bytes received so far
                             startedat  RFC 3339 timestamp (Go's MarshalText form)
                             updatedat  rewritten on close; data's mtime may be newer
                             total      expected size, only when the client gave one
                             expected   expected digest, only when given (berth extra)

Refs are arbitrary client strings (``../../etc`` included), so the directory name is
the hash of the ref, never the ref. Everything here blocks; callers run it in a
worker thread, one call per operation.
"""

from __future__ import annotations

import calendar
import contextlib
import errno
import hashlib
import os
import re
import shutil
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from berth.core.content import digest as dg

REF, DATA, STARTED, UPDATED, TOTAL, EXPECTED = (
    "ref", "data", "startedat", "updatedat", "total", "expected",
)

# Big reads keep the per-call overhead (syscall, GIL hand-off) small next to hashing.
REHASH_CHUNK = 4 << 20


@dataclass(frozen=True, slots=True)
class Status:
    """Progress of one ingest (containerd's content.Status)."""

    ref: str
    offset: int
    total: int
    expected: str | None
    started_at: datetime
    updated_at: datetime


@dataclass(slots=True)
class Opened:
    """An ingest opened for writing: the data fd is positioned at ``offset``."""

    fd: int
    offset: int
    total: int
    expected: str | None
    started_ns: int
    updated_ns: int
    hashers: dict[str, Any]
    resumed: bool
    rehashed: bool


@dataclass(frozen=True, slots=True)
class Saved:
    """Hash state kept in memory after a close, valid while the data file is untouched."""

    ino: int
    size: int
    mtime_ns: int
    hashers: dict[str, Any]


def dir_name(ref: str) -> str:
    return hashlib.sha256(ref.encode("utf-8", "surrogatepass")).hexdigest()


def ns_to_datetime(ns: int) -> datetime:
    return datetime.fromtimestamp(ns / 1e9, tz=UTC)


# --- timestamps -------------------------------------------------------------------

_RFC3339 = re.compile(
    r"(\d{4})-(\d\d)-(\d\d)T(\d\d):(\d\d):(\d\d)(?:\.(\d{1,9}))?(Z|[+-]\d\d:\d\d)"
)


def format_ns(ns: int) -> str:
    """Go's RFC3339Nano in UTC (trailing zeros of the fraction dropped)."""
    secs, frac = divmod(ns, 1_000_000_000)
    text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(secs))
    if frac:
        text += "." + f"{frac:09d}".rstrip("0")
    return text + "Z"


def parse_ns(text: str) -> int:
    m = _RFC3339.fullmatch(text.strip())
    if m is None:
        raise ValueError(f"bad timestamp {text!r}")
    year, month, day, hour, minute, sec = (int(g) for g in m.groups()[:6])
    frac = int((m.group(7) or "").ljust(9, "0"))
    zone = m.group(8)
    offset = 0
    if zone != "Z":
        sign = 1 if zone[0] == "+" else -1
        offset = sign * (int(zone[1:3]) * 3600 + int(zone[4:6]) * 60)
    secs = calendar.timegm((year, month, day, hour, minute, sec, 0, 0, 0)) - offset
    return secs * 1_000_000_000 + frac


# --- small files ------------------------------------------------------------------

def _write_file(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    finally:
        os.close(fd)


def replace_file(path: Path, data: bytes) -> None:
    """Write via a temporary name and rename, so readers see old or new, never half."""
    tmp = path.with_name(path.name + ".tmp")
    _write_file(tmp, data)
    os.replace(tmp, path)


def write_updated(path: Path, ns: int) -> None:
    replace_file(path / UPDATED, format_ns(ns).encode())


# --- reading ----------------------------------------------------------------------

def read_status(path: Path) -> Status:
    """Status of the ingest in ``path``; FileNotFoundError when it is not a whole ingest."""
    st = os.stat(path / DATA)
    ref = (path / REF).read_bytes().decode("utf-8", "surrogatepass")
    started = parse_ns((path / STARTED).read_text())
    updated = parse_ns((path / UPDATED).read_text())
    # updatedat is only rewritten on close; the data file's mtime tracks live writes.
    updated = max(updated, st.st_mtime_ns)
    return Status(
        ref=ref,
        offset=st.st_size,
        total=read_total(path),
        expected=read_expected(path),
        started_at=ns_to_datetime(started),
        updated_at=ns_to_datetime(updated),
    )


def read_total(path: Path) -> int:
    try:
        return max(int((path / TOTAL).read_text()), 0)
    except (OSError, ValueError):
        return 0  # missing or corrupt: the total is advisory


def read_expected(path: Path) -> str | None:
    try:
        text = (path / EXPECTED).read_text().strip()
    except OSError:
        return None
    return text if dg.problem(text) is None else None


def list_dirs(ingest_root: Path) -> list[Path]:
    try:
        with os.scandir(ingest_root) as it:
            return [Path(e.path) for e in it if e.is_dir(follow_symlinks=False)]
    except FileNotFoundError:
        return []


def list_statuses(ingest_root: Path) -> list[Status]:
    out = []
    for path in list_dirs(ingest_root):
        try:
            out.append(read_status(path))
        except (FileNotFoundError, NotADirectoryError):
            continue  # committed or aborted while we looked, or never finished creating
        except (OSError, ValueError, UnicodeDecodeError):
            continue  # damaged ingest: invisible here, cleanup() removes it
    return out


# --- hashing ----------------------------------------------------------------------

def rehash(fd: int, hashers: Iterable[Any], size: int) -> None:
    """Feed bytes [0, size) of ``fd`` to every hasher (reads with pread: fd offset kept)."""
    hashers = list(hashers)
    buf = bytearray(min(REHASH_CHUNK, max(size, 1)))
    view = memoryview(buf)
    pos = 0
    while pos < size:
        n = os.preadv(fd, [view[: min(len(buf), size - pos)]], pos)
        if n == 0:
            raise OSError(errno.EIO, f"ingest data shorter than {size} bytes")
        for h in hashers:
            h.update(view[:n])
        pos += n


def new_hashers(algorithms: Iterable[str]) -> dict[str, Any]:
    return {a: dg.new_hasher(a) for a in dict.fromkeys(algorithms)}


# --- opening ----------------------------------------------------------------------

def open_ingest(
    path: Path,
    ref: str,
    total: int,
    expected: str | None,
    algorithms: Iterable[str],
    saved: Saved | None,
    log: Any,
) -> Opened:
    """Create the ingest for ``ref`` or resume the one already there.

    Resuming needs the hash of the bytes already written: taken from ``saved`` when the
    file is exactly as this process left it, otherwise computed once from the file.
    An ingest that cannot be resumed (damaged, or a different total) starts over, as
    containerd does.
    """
    algorithms = list(dict.fromkeys(algorithms))
    try:
        os.mkdir(path, 0o755)
    except FileExistsError:
        try:
            return _resume(path, ref, total, expected, algorithms, saved)
        except (OSError, ValueError, UnicodeDecodeError) as exc:
            log.info("ingest not resumable, starting over", ref=ref, path=str(path),
                     error=str(exc))
    return _create(path, ref, total, expected, algorithms)


def _create(path: Path, ref: str, total: int, expected: str | None,
            algorithms: list[str]) -> Opened:
    now = time.time_ns()
    # Remove what a damaged ingest may have left, then write the metadata before the
    # data file: "data exists" is what marks an ingest as whole.
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path / DATA)
    for name in (TOTAL, EXPECTED):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path / name)
    _write_file(path / REF, ref.encode("utf-8", "surrogatepass"))
    stamp = format_ns(now).encode()
    _write_file(path / STARTED, stamp)
    _write_file(path / UPDATED, stamp)
    if total > 0:
        _write_file(path / TOTAL, str(total).encode())
    if expected:
        _write_file(path / EXPECTED, expected.encode())
    fd = os.open(path / DATA, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    return Opened(fd=fd, offset=0, total=max(total, 0), expected=expected, started_ns=now,
                  updated_ns=now, hashers=new_hashers(algorithms), resumed=False,
                  rehashed=False)


def _resume(path: Path, ref: str, total: int, expected: str | None,
            algorithms: list[str], saved: Saved | None) -> Opened:
    on_disk = (path / REF).read_bytes().decode("utf-8", "surrogatepass")
    if on_disk != ref:
        # A sha256 collision between two refs, or a damaged layout: refuse to mix them.
        raise ValueError(f"ref key does not match: {ref!r} != {on_disk!r}")
    started = parse_ns((path / STARTED).read_text())
    updated = parse_ns((path / UPDATED).read_text())
    old_total = read_total(path)
    if total > 0 and old_total > 0 and total != old_total:
        raise ValueError(f"provided total differs from status: {total} != {old_total}")
    if total > 0 and old_total == 0:
        _write_file(path / TOTAL, str(total).encode())
    old_expected = read_expected(path)
    if expected and expected != old_expected:
        _write_file(path / EXPECTED, expected.encode())
    expected = expected or old_expected
    if expected:
        algorithms = list(dict.fromkeys([*algorithms, dg.parse(expected).algorithm]))

    fd = os.open(path / DATA, os.O_WRONLY | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if st.st_nlink != 1:
            # Shared with a blob (or anything else): writing here would change it.
            raise ValueError("ingest data file has other links")
        hashers: dict[str, Any] | None = None
        rehashed = False
        if (saved is not None and (saved.ino, saved.size, saved.mtime_ns)
                == (st.st_ino, st.st_size, st.st_mtime_ns)
                and all(a in saved.hashers for a in algorithms)):
            hashers = {a: saved.hashers[a].copy() for a in algorithms}
        if hashers is None:
            hashers = new_hashers(algorithms)
            # Hash through a read-only descriptor: ours is write-only.
            rfd = os.open(path / DATA, os.O_RDONLY | os.O_CLOEXEC)
            try:
                rehash(rfd, hashers.values(), st.st_size)
            finally:
                os.close(rfd)
            rehashed = True
        os.lseek(fd, st.st_size, os.SEEK_SET)
    except BaseException:
        os.close(fd)
        raise
    return Opened(fd=fd, offset=st.st_size, total=total if total > 0 else old_total,
                  expected=expected, started_ns=started,
                  updated_ns=max(updated, st.st_mtime_ns), hashers=hashers, resumed=True,
                  rehashed=rehashed)


# --- removal ----------------------------------------------------------------------

def remove(path: Path) -> bool:
    """Remove an ingest directory; False if it was not there."""
    try:
        shutil.rmtree(path)
    except FileNotFoundError:
        return False
    except NotADirectoryError:
        os.unlink(path)
    return True


def stale(path: Path, cutoff_ns: int) -> bool:
    """Whether the ingest in ``path`` was last touched before ``cutoff_ns``."""
    newest = 0
    with os.scandir(path) as it:
        for entry in it:
            with contextlib.suppress(FileNotFoundError):
                newest = max(newest, entry.stat(follow_symlinks=False).st_mtime_ns)
    with contextlib.suppress(OSError, ValueError):
        newest = max(newest, parse_ns((path / UPDATED).read_text()))
    if newest == 0:
        newest = os.stat(path).st_mtime_ns
    return newest < cutoff_ns
