"""What image transfers report while they run; the CLI draws it, tests may record it."""

from __future__ import annotations

from berth.core.images.manifest import Descriptor


def first_error(group: BaseExceptionGroup) -> BaseException:
    """The error a task group failed with, for callers that expect one (the others are
    usually the cancellations it caused)."""
    exc: BaseException = group
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc


class Progress:
    """Callbacks of a pull or push; every method may be called from any task."""

    def resolved(self, ref: str, desc: Descriptor) -> None:
        """The reference named ``desc``."""

    def start(self, desc: Descriptor, offset: int) -> None:
        """A transfer of ``desc`` begins at ``offset`` (> 0: resumed)."""

    def advance(self, desc: Descriptor, n: int) -> None:
        """``n`` more bytes of ``desc`` moved."""

    def done(self, desc: Descriptor, status: str) -> None:
        """``desc`` is finished: "done", "exists" (nothing to move) or "mounted"."""

    def unpacked(self, index: int, chain_id: str, applied: bool) -> None:
        """Layer ``index`` is in snapshot ``chain_id`` (applied False: it was there)."""
