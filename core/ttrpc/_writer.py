"""One task owns a connection's write side; everyone else hands it whole frames.

A trio stream must not be written from two tasks at once, and a task cancelled in
the middle of ``send_all`` would leave half a frame on the wire and desynchronise
the peer. Queueing complete frames to a single writer avoids both: a caller that
is cancelled while queueing sends nothing, and a queued frame is written whole.
Frames that pile up while a write is in progress go out in one ``send_all``.
"""

from __future__ import annotations

import trio

_QUEUE_DEPTH = 64
_BATCH_BYTES = 256 * 1024


class FrameWriter:
    def __init__(self, stream: trio.abc.SendStream) -> None:
        self._stream = stream
        self._send, self._receive = trio.open_memory_channel[bytes](_QUEUE_DEPTH)

    async def send(self, frame: bytes) -> None:
        """Queue a frame. Raises trio.BrokenResourceError once the writer has stopped."""
        await self._send.send(frame)

    def close(self) -> None:
        """No more frames: the writer flushes what is queued, then returns."""
        self._send.close()

    async def run(self) -> None:
        """Write frames until closed. Stream errors end the loop; callers see them
        as BrokenResourceError on their next ``send``."""
        receive = self._receive
        try:
            async for frame in receive:
                batch = [frame]
                size = len(frame)
                while size < _BATCH_BYTES:
                    try:
                        more = receive.receive_nowait()
                    except (trio.WouldBlock, trio.EndOfChannel):
                        break
                    batch.append(more)
                    size += len(more)
                await self._stream.send_all(batch[0] if len(batch) == 1 else b"".join(batch))
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        finally:
            receive.close()
