"""One task owns a connection's write side; everyone else hands it whole frames.

A trio stream must not be written from two tasks at once, and a task cancelled in
the middle of ``send_all`` would leave half a frame on the wire and desynchronise
the peer. Queueing complete frames to a single writer avoids both: a caller that
is cancelled while queueing sends nothing, and a queued frame is written whole.
Frames that pile up while a write is in progress go out in one ``send_all``.

With ``direct=True`` (a socket stream only) a caller writes its frame itself when
nothing is queued: one non-blocking ``write`` on the socket, no hand-off to the writer
task and back (two task steps fewer per frame). It cannot be interrupted halfway, being
one synchronous call; whatever the socket did not take goes to the writer task as the
next frame, so frames never interleave.
"""

from __future__ import annotations

import os

import trio

_QUEUE_DEPTH = 64
_BATCH_BYTES = 256 * 1024


class FrameWriter:
    def __init__(self, stream: trio.abc.SendStream, *, direct: bool = False) -> None:
        self._stream = stream
        self._send, self._receive = trio.open_memory_channel[bytes](_QUEUE_DEPTH)
        # The socket's descriptor while direct writes are allowed; -1 once closed, so a
        # number the kernel may give to another file is never written to.
        self._fd = stream.socket.fileno() if direct and isinstance(stream, trio.SocketStream) \
            else -1
        self._queued = 0  # frames handed to the writer task and not yet written

    async def send(self, frame: bytes) -> None:
        """Send or queue a frame. Raises trio.BrokenResourceError once the writer has
        stopped (trio.ClosedResourceError once closed)."""
        if self._queued == 0 and self._fd >= 0:
            # The same cancellation point as queueing: a cancelled caller sends nothing.
            await trio.lowlevel.checkpoint_if_cancelled()
            if self._queued == 0 and self._fd >= 0:
                try:
                    sent = os.write(self._fd, frame)
                except BlockingIOError:
                    sent = 0
                except OSError as exc:
                    self._fd = -1
                    raise trio.BrokenResourceError(str(exc)) from exc
                if sent == len(frame):
                    return
                # The rest must be the next bytes on the wire: nothing is queued, so the
                # writer task sends it before anything handed to it later.
                self._queued += 1
                try:
                    self._send.send_nowait(frame[sent:])
                except BaseException:
                    self._queued -= 1
                    raise
                return
        self._queued += 1
        try:
            await self._send.send(frame)
        except BaseException:
            self._queued -= 1
            raise

    def close(self) -> None:
        """No more frames: the writer flushes what is queued, then returns."""
        self._fd = -1
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
                self._queued -= len(batch)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        finally:
            self._fd = -1
            receive.close()
