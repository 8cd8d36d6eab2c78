"""File-tree helpers the local snapshotters share: disk usage, faithful copies, removal.

These block; snapshotters run them in worker threads. Errors on the root of a walk read
like Go's (``lstat /x: no such file or directory``) because clients print them.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import stat

from berth.core import errdefs
from berth.core.snapshots import Usage


def go_strerror(code: int) -> str:
    """Go's wording of an errno: glibc's text, first letter lowercase."""
    text = os.strerror(code)
    return text[:1].lower() + text[1:]


def os_error(op: str, e: OSError) -> errdefs.BerthError:
    """An OSError as containerd reports it: "<op> <path>: <reason>" with code Unknown."""
    return errdefs.Unknown(f"{op} {e.filename}: {go_strerror(e.errno or 0)}", raw=True)


def disk_usage(root: str) -> Usage:
    """Blocks (in bytes) and inodes under ``root``, each inode counted once (continuity)."""
    seen: set[tuple[int, int]] = set()
    size = 0
    try:
        st = os.lstat(root)
    except OSError as e:
        raise os_error("lstat", e) from None
    stack = [(root, st)]
    while stack:
        path, st = stack.pop()
        ino = (st.st_dev, st.st_ino)
        if ino not in seen:
            seen.add(ino)
            size += st.st_blocks * 512
        if stat.S_ISDIR(st.st_mode):
            try:
                with os.scandir(path) as it:
                    for entry in it:
                        stack.append((entry.path, entry.stat(follow_symlinks=False)))
            except OSError as e:
                raise os_error("open", e) from None
    return Usage(inodes=len(seen), size=size)


def _copy_xattrs(src: str, dst: str) -> None:
    # Like containerd's native snapshotter: xattrs that cannot be copied are skipped.
    try:
        names = os.listxattr(src, follow_symlinks=False)
    except OSError:
        return
    for name in names:
        with contextlib.suppress(OSError):
            os.setxattr(dst, name, os.getxattr(src, name, follow_symlinks=False),
                        follow_symlinks=False)


def _copy_info(st: os.stat_result, src: str, dst: str) -> None:
    try:
        os.lchown(dst, st.st_uid, st.st_gid)
    except PermissionError:
        mine = os.lstat(dst)
        if (mine.st_uid, mine.st_gid) != (st.st_uid, st.st_gid):
            raise
    if not stat.S_ISLNK(st.st_mode):
        os.chmod(dst, stat.S_IMODE(st.st_mode))
    os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)
    _copy_xattrs(src, dst)


def _copy_file(src: str, dst: str) -> None:
    with open(src, "rb") as fi, open(dst, "wb") as fo:
        remaining = os.fstat(fi.fileno()).st_size
        try:
            while remaining > 0:
                n = os.copy_file_range(fi.fileno(), fo.fileno(), remaining)
                if n == 0:
                    break
                remaining -= n
        except OSError as e:
            if e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
                raise
            shutil.copyfileobj(fi, fo, 1 << 20)


def copy_dir(dst: str, src: str) -> None:
    """Copy the tree at ``src`` into ``dst`` keeping owners, modes, times, xattrs,
    symlinks, device nodes, fifos and hard links (continuity's fs.CopyDir)."""
    links: dict[tuple[int, int], str] = {}
    _copy_tree(dst, src, links)


def _copy_tree(dst: str, src: str, links: dict[tuple[int, int], str]) -> None:
    st = os.stat(src)
    if not stat.S_ISDIR(st.st_mode):
        raise errdefs.InvalidArgument(f"source {src} is not directory", raw=True)
    if os.path.isdir(dst):
        os.chmod(dst, stat.S_IMODE(st.st_mode))
    else:
        os.mkdir(dst, stat.S_IMODE(st.st_mode))
    with os.scandir(src) as it:
        entries = sorted(it, key=lambda e: e.name)
    _copy_info(st, src, dst)
    for entry in entries:
        s, d = entry.path, os.path.join(dst, entry.name)
        est = entry.stat(follow_symlinks=False)
        mode = est.st_mode
        if stat.S_ISDIR(mode):
            _copy_tree(d, s, links)
            continue
        if stat.S_ISREG(mode):
            key = (est.st_dev, est.st_ino)
            if est.st_nlink > 1 and key in links:
                os.link(links[key], d)
            else:
                if est.st_nlink > 1:
                    links[key] = d
                _copy_file(s, d)
        elif stat.S_ISLNK(mode):
            os.symlink(os.readlink(s), d)
        elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode) or stat.S_ISFIFO(mode) \
                or stat.S_ISSOCK(mode):
            os.mknod(d, mode, est.st_rdev)
        else:
            continue
        _copy_info(est, s, d)


def _gone_is_fine(func: object, path: str, exc_info: tuple) -> None:
    if not isinstance(exc_info[1], FileNotFoundError):
        raise exc_info[1]


def remove_tree(path: str) -> None:
    """rm -rf that does not mind a missing path (or entries vanishing meanwhile)."""
    shutil.rmtree(path, onerror=_gone_is_fine)
