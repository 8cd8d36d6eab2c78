"""Progress of pulls and pushes on a terminal (rich bars) or in a log (plain lines)."""

from __future__ import annotations

import sys
import threading
from typing import Any

from berth.core.client.images.progress import Progress
from berth.core.images.manifest import Descriptor


def human(n: float) -> str:
    """Sizes as ctr prints them (1012.8 KiB)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _label(desc: Descriptor) -> str:
    from berth.core.images.mediatypes import ref_key

    return ref_key(desc.media_type, desc.digest)


class PlainProgress(Progress):
    """One line per event, for logs and pipes."""

    def __init__(self, out: Any = None) -> None:
        self.out = out or sys.stdout
        self._moved: dict[str, int] = {}
        self._lock = threading.Lock()

    def _print(self, text: str) -> None:
        print(text, file=self.out, flush=True)

    def resolved(self, ref: str, desc: Descriptor) -> None:
        self._print(f"{ref}: resolved {desc.digest}")

    def start(self, desc: Descriptor, offset: int) -> None:
        self._moved[desc.digest] = offset
        if offset:
            self._print(f"{_label(desc)}: resuming at {offset} of {desc.size} bytes")
        else:
            self._print(f"{_label(desc)}: started, {desc.size} bytes")

    def advance(self, desc: Descriptor, n: int) -> None:
        with self._lock:
            self._moved[desc.digest] = self._moved.get(desc.digest, 0) + n

    def done(self, desc: Descriptor, status: str) -> None:
        self._print(f"{_label(desc)}: {status} ({human(desc.size)})")

    def unpacked(self, index: int, chain_id: str, applied: bool) -> None:
        self._print(f"layer {index}: {'unpacked' if applied else 'already unpacked'} "
                    f"as {chain_id}")


class RichProgress(Progress):
    """A bar per blob: bytes, speed, time left."""

    def __init__(self) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress as Bars,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )

        self.console = Console(stderr=True, highlight=False)
        self.bars = Bars(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                         TransferSpeedColumn(), TimeRemainingColumn(), console=self.console)
        self._tasks: dict[str, Any] = {}

    def __enter__(self) -> RichProgress:
        self.bars.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.bars.stop()

    def _task(self, desc: Descriptor, completed: int = 0) -> Any:
        task = self._tasks.get(desc.digest)
        if task is None:
            name = f"{_label(desc).split(':')[0]}:{desc.digest.split(':')[-1][:12]}"
            task = self.bars.add_task(name, total=desc.size, completed=completed)
            self._tasks[desc.digest] = task
        return task

    def resolved(self, ref: str, desc: Descriptor) -> None:
        self.console.print(f"{ref}: resolved {desc.digest}")

    def start(self, desc: Descriptor, offset: int) -> None:
        task = self._task(desc, offset)
        self.bars.reset(task, total=desc.size, completed=offset)

    def advance(self, desc: Descriptor, n: int) -> None:
        self.bars.advance(self._task(desc), n)

    def done(self, desc: Descriptor, status: str) -> None:
        task = self._task(desc)
        self.bars.update(task, completed=desc.size,
                         description=f"{self.bars.tasks[task].description} {status}")

    def unpacked(self, index: int, chain_id: str, applied: bool) -> None:
        self.console.print(f"layer {index}: {'unpacked' if applied else 'already unpacked'} "
                           f"as {chain_id}")


def for_terminal() -> Any:
    """Rich bars when stderr is a terminal, plain lines otherwise (a context manager)."""
    import contextlib

    if sys.stderr.isatty():
        return RichProgress()
    return contextlib.nullcontext(PlainProgress())
