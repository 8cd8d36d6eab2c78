"""Unpack one OCI layer (a tar stream) into a directory, without ever leaving it.

Every filesystem call is made relative to a directory file descriptor that was
reached from the target's root fd one component at a time with ``O_NOFOLLOW``, and
names handed to the kernel are single components. So no path string is ever
resolved by the kernel through a symlink the layer planted: a parent component
that is a symlink is refused (``a -> /etc`` then ``a/passwd``), a symlink at the
final component of an entry is replaced rather than followed, hard links must name
an existing non-directory inside the tree. containerd instead follows in-tree
symlinks while clamping them to the root; berth refuses, because a layer produced
from a real filesystem never writes through a symlink, and refusing is simpler to
trust.

The decisions about each entry (path cleaning, whiteouts) are made by
``layer.plan`` without I/O; this module only carries them out.

The stream is read once: a read-ahead thread decompresses (via the stream given)
and hashes every byte, so the diff ID (sha256 of the uncompressed tar) comes out
of the same pass and decompression overlaps with writing files.
``apply_layer`` blocks: run it in a worker thread (one hop per layer, not per entry).
"""

from __future__ import annotations

import errno
import functools
import hashlib
import os
import queue
import shutil
import stat
import tarfile
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from berth.core import errdefs, log
from berth.core.archive.compression import ByteSource
from berth.plugins.differ import layer
from berth.plugins.differ.layer import Action, Kind
from berth.plugins.differ.tarheader import FastTarInfo

Mode = Literal["overlay", "native"]

# File data moves in chunks of this size.
COPY_CHUNK = 1 << 20
# The tar reader pulls from the hashing reader in blocks of this size. Small
# enough that the leftovers tarfile copies on every header read stay cheap.
TAR_BLOCK = 16 << 10
# The stream is read ahead in chunks of this size, at most this many waiting.
PREFETCH_CHUNK = 4 << 20
PREFETCH_DEPTH = 4
# Directory fds kept open between entries (entries of a layer come grouped by
# directory, so a small cache hits almost always).
DIR_CACHE = 64

_O_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_O_NEWFILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC

OVERLAY_OPAQUE_XATTR = "trusted.overlay.opaque"

_log = log.get("differ")


@dataclass(frozen=True, slots=True)
class ApplyResult:
    """``size``: bytes of uncompressed tar read; ``diff_id``: ``sha256:<hex>`` of them."""

    size: int
    diff_id: str


def apply_layer(
    stream: ByteSource,
    target: Path | str,
    *,
    mode: Mode = "overlay",
    parents: Sequence[Path | str] = (),
) -> ApplyResult:
    """Apply the uncompressed layer tar ``stream`` onto the directory ``target``.

    ``mode`` says how whiteouts land: ``native`` deletes what they name (the target
    holds the lower layers); ``overlay`` records them as overlayfs does (0:0
    character devices, ``trusted.overlay.opaque=y``) because the target is an
    empty upper directory. ``parents`` are the lower directories, top-most first:
    when the layer needs a directory it does not describe, its owner, mode, times
    and xattrs are copied from the first lower that has it (as containerd does).

    Raises InvalidArgument naming the entry when the layer breaks the rules, and
    leaves whatever was applied before the failing entry in place. ``stream`` is
    read from a helper thread that this call starts and joins.
    """
    if mode not in ("overlay", "native"):
        raise errdefs.InvalidArgument(f"unknown apply mode {mode!r}")
    try:
        root_fd = os.open(target, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise errdefs.NotFound(f"apply target {str(target)!r}") from None
    try:
        reader = HashingReader(stream)
        try:
            unpacker = _Unpacker(root_fd, mode, [str(p) for p in parents])
            try:
                _unpack(reader, unpacker)
            finally:
                unpacker.close()
            reader.drain()
        finally:
            reader.close()
    finally:
        os.close(root_fd)
    return ApplyResult(size=reader.size, diff_id=reader.digest())


class HashingReader:
    """Reads ``src`` ahead in a worker thread while hashing and counting it.

    Decompression and sha256 release the GIL, so they run beside the unpacking
    instead of before each read; the hand-over is per chunk of a few MiB, never per
    entry. The thread belongs to this object: ``close()`` stops and joins it.
    """

    def __init__(self, src: ByteSource, *, chunk: int = PREFETCH_CHUNK,
                 depth: int = PREFETCH_DEPTH) -> None:
        self._src = src
        self._chunk = chunk
        self._hash = hashlib.sha256()
        self.size = 0
        self._queue: queue.Queue[bytes | BaseException] = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._buf = b""
        self._pos = 0
        self._eof = False
        self._thread = threading.Thread(target=self._produce, name="layer-prefetch", daemon=True)
        self._thread.start()

    def _produce(self) -> None:
        item: bytes | BaseException
        try:
            while True:
                item = self._src.read(self._chunk)
                self._hash.update(item)
                self.size += len(item)
                if not self._put(item) or not item:
                    return
        except BaseException as exc:  # handed to the reading side, which raises it
            self._put(exc)

    def _put(self, item: bytes | BaseException) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def read(self, n: int = -1) -> bytes:
        if self._pos >= len(self._buf):
            if self._eof:
                return b""
            item = self._queue.get()
            if isinstance(item, BaseException):
                self._eof = True
                raise item
            if not item:
                self._eof = True
                return b""
            self._buf, self._pos = item, 0
        pos = self._pos
        end = len(self._buf) if n < 0 else min(len(self._buf), pos + n)
        self._pos = end
        if pos == 0 and end == len(self._buf):
            return self._buf
        return self._buf[pos:end]

    def drain(self) -> None:
        """Read (and hash) what the tar reader left: end-of-archive padding."""
        while self.read(PREFETCH_CHUNK):
            pass

    def digest(self) -> str:
        if not self._eof:
            raise RuntimeError("digest before the end of the stream")
        return "sha256:" + self._hash.hexdigest()

    def close(self) -> None:
        self._stop.set()
        # Unblock a producer waiting on a full queue; it then sees the stop flag.
        while self._thread.is_alive():
            try:
                self._queue.get_nowait()
            except queue.Empty:
                self._thread.join(0.05)
        self._thread.join()


def _unpack(reader: HashingReader, unpacker: _Unpacker) -> None:
    try:
        # Stream mode ("r|") only ever calls read(); typeshed's tarfile asks every
        # fileobj for write/seek/tell too.
        tar = tarfile.open(  # type: ignore[call-overload]
            fileobj=reader,
            mode="r|",
            bufsize=TAR_BLOCK,
            encoding="utf-8",
            errors="surrogateescape",
            tarinfo=FastTarInfo,
        )
    except tarfile.ReadError as exc:
        if reader.size == 0:
            return  # an empty blob is an empty layer (docker/docker#18170)
        raise errdefs.InvalidArgument(f"invalid layer tar: {exc}") from None
    with tar:
        while True:
            try:
                info = tar.next()
            except tarfile.TarError as exc:
                raise errdefs.InvalidArgument(f"invalid layer tar: {exc}") from None
            if info is None:
                break
            # Stream mode remembers every member; a big layer has no use for that.
            tar.members.clear()
            unpacker.entry(info, _data_reader(tar, info))
        unpacker.finish()


def _data_reader(tar: tarfile.TarFile, info: tarfile.TarInfo) -> Callable[[int], bytes]:
    if info.sparse is not None:
        # Sparse members need the holes filled in: tarfile's member reader does it.
        member = tar.extractfile(info)
        assert member is not None
        return member.read
    # The member's data sits at the stream position; reading it straight from the
    # stream saves a layer of buffering and copies per chunk.
    return tar.fileobj.read


class _DirCache:
    """Directory fds inside the root, by component path.

    Each is reached from a cached ancestor with O_NOFOLLOW|O_DIRECTORY, so a
    symlink or a non-directory on the way stops the walk. Evicted fds are closed
    only at ``release()`` (after each entry), so an fd handed out stays valid while
    the entry is being applied.
    """

    def __init__(self, root_fd: int, on_create: Callable[[int, tuple[str, ...]], None]) -> None:
        self._root_fd = root_fd
        self._fds: OrderedDict[tuple[str, ...], int] = OrderedDict()
        self._retired: list[int] = []
        self._on_create = on_create

    def get(self, path: tuple[str, ...], entry: str, *, create: bool) -> int | None:
        """The fd of directory ``path``; None if missing and not ``create``."""
        if not path:
            return self._root_fd
        fd = self._fds.get(path)
        if fd is not None:
            self._fds.move_to_end(path)
            return fd
        # Walk down from the deepest cached ancestor.
        start = len(path) - 1
        while start > 0 and path[:start] not in self._fds:
            start -= 1
        fd = self._fds[path[:start]] if start else self._root_fd
        for depth in range(start, len(path)):
            sub = path[: depth + 1]
            fd = self._open_child(fd, sub, entry, create=create)
            if fd is None:
                return None
            self.put(sub, fd)
        return fd

    def _open_child(self, parent_fd: int, sub: tuple[str, ...], entry: str, *,
                    create: bool) -> int | None:
        name = sub[-1]
        try:
            return os.open(name, _O_DIR, dir_fd=parent_fd)
        except FileNotFoundError:
            if not create:
                return None
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                raise self._not_a_dir(parent_fd, sub, entry) from None
            raise
        try:
            os.mkdir(name, 0o755, dir_fd=parent_fd)
        except FileExistsError:
            pass  # lost a race with nobody, or a dangling symlink: the open decides
        try:
            fd = os.open(name, _O_DIR, dir_fd=parent_fd)
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                raise self._not_a_dir(parent_fd, sub, entry) from None
            raise
        try:
            self._on_create(fd, sub)
        except BaseException:
            os.close(fd)
            raise
        return fd

    @staticmethod
    def _not_a_dir(parent_fd: int, sub: tuple[str, ...], entry: str) -> errdefs.InvalidArgument:
        shown = "/".join(sub)
        try:
            st = os.stat(sub[-1], dir_fd=parent_fd, follow_symlinks=False)
        except OSError:
            return layer.invalid(entry, f"parent {shown!r} is not a directory")
        if stat.S_ISLNK(st.st_mode):
            return layer.invalid(
                entry, f"parent {shown!r} is a symlink; a layer may not write through links"
            )
        return layer.invalid(entry, f"parent {shown!r} is not a directory")

    def put(self, path: tuple[str, ...], fd: int) -> None:
        old = self._fds.pop(path, None)
        if old is not None and old != fd:
            self._retired.append(old)
        self._fds[path] = fd
        while len(self._fds) > DIR_CACHE:
            _, evicted = self._fds.popitem(last=False)
            self._retired.append(evicted)

    def forget(self, path: tuple[str, ...]) -> None:
        """Drop ``path`` and everything below it (it is being removed or replaced)."""
        n = len(path)
        for key in [k for k in self._fds if k[:n] == path]:
            self._retired.append(self._fds.pop(key))

    def release(self) -> None:
        retired, self._retired = self._retired, []
        for fd in retired:
            os.close(fd)

    def close(self) -> None:
        self._retired.extend(self._fds.values())
        self._fds.clear()
        self.release()


class _Unpacker:
    def __init__(self, root_fd: int, mode: Mode, parents: list[str]) -> None:
        self._root_fd = root_fd
        self._overlay = mode == "overlay"
        self._parents = parents
        self._dirs = _DirCache(root_fd, self._init_implicit_dir)
        # Paths created by this layer, and the directories above them: whiteouts
        # and opaque markers only hide what lower layers put there.
        self._unpacked: set[tuple[str, ...]] = set()
        self._above_unpacked: set[tuple[str, ...]] = set()
        # Directory times are set last, after their content stopped changing them.
        self._dir_times: list[tuple[tuple[str, ...], int, int]] = []

    def close(self) -> None:
        self._dirs.close()

    # -- one entry ---------------------------------------------------------

    def entry(self, info: tarfile.TarInfo, read: Callable[[int], bytes]) -> None:
        name = info.name
        action = layer.plan(name, info.type, info.linkname)
        try:
            self._apply(action, info, read)
        except errdefs.BerthError:
            raise
        except OSError as exc:
            raise errdefs.Unknown(
                f"apply layer entry {name!r}: {exc.strerror or exc}", raw=True
            ) from exc
        finally:
            self._dirs.release()

    def _apply(self, action: Action, info: tarfile.TarInfo, read: Callable[[int], bytes]) -> None:
        kind = action.kind
        if kind is Kind.SKIP:
            if action.reason != "resolves to the root":
                _log.debug("layer entry skipped", entry=info.name, reason=action.reason)
            return
        if kind is Kind.WHITEOUT:
            self._whiteout(action, info)
            return
        if kind is Kind.OPAQUE:
            self._opaque(action, info)
            return

        pfd = self._dirs.get(action.parent, info.name, create=True)
        assert pfd is not None
        base = action.base
        if kind is Kind.FILE:
            self._file(pfd, action, info, read)
        elif kind is Kind.DIR:
            self._dir(pfd, action, info)
        elif kind is Kind.SYMLINK:
            self._create(pfd, action, lambda: os.symlink(info.linkname, base, dir_fd=pfd))
            self._meta_at(pfd, base, info, chmod=False)
        elif kind is Kind.HARDLINK:
            self._hardlink(pfd, action, info)
        else:
            fmt = {Kind.CHAR: stat.S_IFCHR, Kind.BLOCK: stat.S_IFBLK, Kind.FIFO: stat.S_IFIFO}
            dev = os.makedev(info.devmajor, info.devminor) if kind is not Kind.FIFO else 0
            mode = fmt[kind] | (info.mode & 0o7777)
            self._create(pfd, action, lambda: os.mknod(base, mode, dev, dir_fd=pfd))
            self._meta_at(pfd, base, info, chmod=True)
        self._mark_unpacked(action.path)

    def _file(self, pfd: int, action: Action, info: tarfile.TarInfo,
              read: Callable[[int], bytes]) -> None:
        base = action.base
        fd = self._create(pfd, action, lambda: os.open(base, _O_NEWFILE, 0o600, dir_fd=pfd))
        try:
            remaining = info.size
            write = os.write
            while remaining:
                chunk = read(COPY_CHUNK if remaining > COPY_CHUNK else remaining)
                if not chunk:
                    raise errdefs.InvalidArgument(
                        f"layer entry {info.name!r}: unexpected end of tar data"
                    )
                remaining -= len(chunk)
                written = write(fd, chunk)
                if written != len(chunk):
                    view = memoryview(chunk)[written:]
                    while view:
                        view = view[write(fd, view):]
            self._meta_fd(fd, info)
        finally:
            os.close(fd)

    def _dir(self, pfd: int, action: Action, info: tarfile.TarInfo) -> None:
        base = action.base
        try:
            os.mkdir(base, 0o700, dir_fd=pfd)
        except FileExistsError:
            st = os.stat(base, dir_fd=pfd, follow_symlinks=False)
            if not stat.S_ISDIR(st.st_mode):
                # A directory replaces whatever was there; two directories merge.
                self._remove(pfd, base, action.path)
                os.mkdir(base, 0o700, dir_fd=pfd)
        fd = os.open(base, _O_DIR, dir_fd=pfd)
        self._dirs.put(action.path, fd)
        self._meta_fd(fd, info, times=False)
        atime, mtime = layer.entry_times(info.mtime, info.pax_headers)
        self._dir_times.append((action.path, atime, mtime))

    def _hardlink(self, pfd: int, action: Action, info: tarfile.TarInfo) -> None:
        assert action.link is not None
        shown = "/".join(action.link)
        lfd = self._dirs.get(action.link[:-1], info.name, create=False)
        if lfd is None:
            raise layer.invalid(info.name, f"hard link target {shown!r} not found in the layer")
        lbase = action.link[-1]
        try:
            st = os.stat(lbase, dir_fd=lfd, follow_symlinks=False)
        except FileNotFoundError:
            raise layer.invalid(
                info.name, f"hard link target {shown!r} not found in the layer"
            ) from None
        if stat.S_ISDIR(st.st_mode):
            raise layer.invalid(info.name, f"hard link target {shown!r} is a directory")
        base = action.base
        # Without AT_SYMLINK_FOLLOW a link to a symlink links the symlink itself.
        self._create(pfd, action, lambda: os.link(
            lbase, base, src_dir_fd=lfd, dst_dir_fd=pfd, follow_symlinks=False
        ))
        self._meta_at(pfd, base, info, chmod=not stat.S_ISLNK(st.st_mode))

    def _create(self, pfd: int, action: Action, make: Callable[[], int | None]) -> int:
        """Run ``make``; if the name is taken, remove what is there and run it again."""
        try:
            return make() or 0
        except FileExistsError:
            self._remove(pfd, action.base, action.path)
            return make() or 0

    # -- metadata ------------------------------------------------------------

    def _meta_fd(self, fd: int, info: tarfile.TarInfo, *, times: bool = True) -> None:
        # Order matters: chown clears setuid/setgid bits and file capabilities, so
        # xattrs (security.capability) and the mode come after it.
        os.fchown(fd, info.uid, info.gid)
        for attr, value in self._xattrs(info):
            self._setxattr(info.name, functools.partial(os.setxattr, fd, attr, value))
        os.fchmod(fd, info.mode & 0o7777)
        if times:
            os.utime(fd, ns=layer.entry_times(info.mtime, info.pax_headers))

    def _meta_at(self, pfd: int, base: str, info: tarfile.TarInfo, *, chmod: bool) -> None:
        """Metadata for what has no fd of its own (symlinks, links, device nodes)."""
        os.chown(base, info.uid, info.gid, dir_fd=pfd, follow_symlinks=False)
        xattrs = self._xattrs(info)
        if xattrs:
            # /proc/self/fd/N is the directory we hold; the last component is not followed.
            path = f"/proc/self/fd/{pfd}/{base}"
            for attr, value in xattrs:
                self._setxattr(info.name, functools.partial(
                    os.setxattr, path, attr, value, follow_symlinks=False))
        if chmod:
            # The name was just created by us and is not a symlink.
            os.chmod(base, info.mode & 0o7777, dir_fd=pfd)
        os.utime(base, ns=layer.entry_times(info.mtime, info.pax_headers), dir_fd=pfd,
                 follow_symlinks=False)

    @staticmethod
    def _xattrs(info: tarfile.TarInfo) -> list[tuple[str, bytes]]:
        if not info.pax_headers:
            return []
        out = []
        for attr, value in layer.xattrs(info.pax_headers).items():
            if layer.xattr_allowed(attr):
                out.append((attr, value))
            else:
                _log.warning("layer xattr ignored", entry=info.name, xattr=attr)
        return out

    @staticmethod
    def _setxattr(entry: str, set_it: Callable[[], None]) -> None:
        try:
            set_it()
        except OSError as exc:
            # As containerd: a filesystem without xattrs, or user.* on a node type
            # that cannot carry it, loses the attribute with a warning.
            if exc.errno in (errno.ENOTSUP, errno.EPERM):
                _log.warning("layer xattr not applied", entry=entry, error=exc.strerror)
                return
            raise

    def _init_implicit_dir(self, fd: int, path: tuple[str, ...]) -> None:
        """A directory the layer did not describe: 0755, or copied from a lower."""
        for lower in self._parents:
            found = _lookup_lower(lower, path)
            if found is None:
                continue
            lower_fd, st = found
            try:
                if not stat.S_ISDIR(st.st_mode):
                    break  # replaced in the lower layers: keep the defaults
                os.fchown(fd, st.st_uid, st.st_gid)
                os.fchmod(fd, stat.S_IMODE(st.st_mode))
                for attr in os.listxattr(lower_fd):
                    if layer.xattr_allowed(attr):
                        os.setxattr(fd, attr, os.getxattr(lower_fd, attr))
                os.utime(fd, ns=(st.st_atime_ns, st.st_mtime_ns))
                return
            finally:
                os.close(lower_fd)
        os.fchmod(fd, 0o755)

    # -- whiteouts -------------------------------------------------------------

    def _whiteout(self, action: Action, info: tarfile.TarInfo) -> None:
        if action.path in self._unpacked:
            return  # a whiteout only hides lower layers, never its own layer's files
        if self._overlay:
            pfd = self._dirs.get(action.parent, info.name, create=True)
            assert pfd is not None
            base = action.base
            self._create(pfd, action, lambda: os.mknod(base, stat.S_IFCHR, 0, dir_fd=pfd))
            os.chown(base, info.uid, info.gid, dir_fd=pfd, follow_symlinks=False)
            return
        pfd = self._dirs.get(action.parent, info.name, create=False)
        if pfd is None:
            return  # nothing there to delete
        self._remove_lower(pfd, action.base, action.path)

    def _opaque(self, action: Action, info: tarfile.TarInfo) -> None:
        fd = self._dirs.get(action.path, info.name, create=True)
        assert fd is not None
        if self._overlay:
            os.setxattr(fd, OVERLAY_OPAQUE_XATTR, b"y")
            return
        for child in os.listdir(fd):
            self._remove_lower(fd, child, action.path + (child,))

    def _mark_unpacked(self, path: tuple[str, ...]) -> None:
        self._unpacked.add(path)
        above = self._above_unpacked
        for depth in range(len(path) - 1, 0, -1):
            parent = path[:depth]
            if parent in above:
                break
            above.add(parent)

    def _remove_lower(self, pfd: int, name: str, path: tuple[str, ...]) -> None:
        """Remove ``name`` and what is below it, except what this layer created."""
        if path in self._unpacked:
            return
        if path not in self._above_unpacked:
            self._remove(pfd, name, path, missing_ok=True)
            return
        fd = os.open(name, _O_DIR, dir_fd=pfd)
        try:
            for child in os.listdir(fd):
                self._remove_lower(fd, child, path + (child,))
        finally:
            os.close(fd)

    def _remove(self, pfd: int, name: str, path: tuple[str, ...], *,
                missing_ok: bool = False) -> None:
        """rm -rf of one name in ``pfd``, never following a symlink."""
        try:
            st = os.stat(name, dir_fd=pfd, follow_symlinks=False)
        except FileNotFoundError:
            if missing_ok:
                return
            raise
        if stat.S_ISDIR(st.st_mode):
            self._dirs.forget(path)
            # shutil's fd-based walk opens each directory with O_NOFOLLOW.
            shutil.rmtree(name, dir_fd=pfd)
        else:
            os.unlink(name, dir_fd=pfd)

    # -- the end -------------------------------------------------------------

    def finish(self) -> None:
        for path, atime, mtime in self._dir_times:
            try:
                fd = self._dirs.get(path, "/".join(path), create=False)
            except errdefs.InvalidArgument:
                continue  # replaced by a non-directory later in the layer
            if fd is not None:
                os.utime(fd, ns=(atime, mtime))
            self._dirs.release()


def _lookup_lower(lower: str, path: Iterable[str]) -> tuple[int, os.stat_result] | None:
    """Open ``path`` in a lower directory without following links; (fd, stat) or None."""
    try:
        fd = os.open(lower, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return None
    for name in path:
        try:
            child = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
                            | os.O_PATH, dir_fd=fd)
        except OSError:
            os.close(fd)
            return None
        os.close(fd)
        fd = child
    st = os.fstat(fd)
    if stat.S_ISDIR(st.st_mode):
        # O_PATH fds cannot read xattrs: reopen the directory itself.
        real = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=fd)
        os.close(fd)
        fd = real
    return fd, st
