"""The kernel data path (Linux): socket -> pipe -> socket with ``os.splice``, so relayed bytes
never enter Python.

Each direction is a small state machine driven by the event loop's reader and writer
callbacks on non-blocking sockets: the source is read only while the pipe is empty, so a
destination that takes nothing stops the reading (backpressure, at most one pipe in flight).
Until its SSH identification line is seen, a direction moves bytes with ordinary
``recv``/``send`` so :class:`~gateway.relay.pump.Flow` can read it; then it splices. Byte
counts are splice's return values. The source's EOF half-closes the destination.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import socket
import sys

from gateway.relay.pump import BANNER_SNIFF_BYTES, Flow, PeerFailed

AVAILABLE = sys.platform == "linux" and hasattr(os, "splice")
PIPE_SIZE = 1 << 20  # fewer wakeups per GiB; pages are only used while bytes are in flight
F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
F_GETPIPE_SZ = getattr(fcntl, "F_GETPIPE_SZ", 1032)
ROUNDS = 8  # splice in/out rounds per readiness callback, before yielding to other connections


def _pipe() -> tuple[int, int, int]:
    """A non-blocking pipe, grown to :data:`PIPE_SIZE` where allowed: (read end, write
    end, its capacity)."""
    read_end, write_end = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    with contextlib.suppress(OSError):  # over the user's pipe-user-pages-soft, say
        fcntl.fcntl(write_end, F_SETPIPE_SZ, PIPE_SIZE)
    return read_end, write_end, fcntl.fcntl(write_end, F_GETPIPE_SZ)


class _Direction:
    """One direction of a connection; ``done`` resolves at EOF or fails with PeerFailed.

    Reading is on while the pipe has room (and nothing read by ``recv`` waits to be
    sent); writing waits for the destination only while bytes are left over.
    """

    def __init__(self, src: socket.socket, dst: socket.socket, flow: Flow) -> None:
        self._loop = asyncio.get_running_loop()
        self._src = src.fileno()
        self._dst = dst.fileno()
        self._dst_socket = dst
        self._flow = flow
        self.done: asyncio.Future[None] = self._loop.create_future()
        self._pending = b""  # read by recv while sniffing the banner, not yet sent
        self._pipe: tuple[int, int, int] | None = None
        self._in_pipe = 0
        self._eof = False
        self._reading = False
        self._writing = False

    def start(self) -> None:
        self._set(reading=True, writing=False)

    def stop(self) -> None:
        self._set(reading=False, writing=False)
        if self._pipe is not None:
            os.close(self._pipe[0])
            os.close(self._pipe[1])
            self._pipe = None

    def _set(self, *, reading: bool, writing: bool) -> None:
        if reading != self._reading:
            if reading:
                self._loop.add_reader(self._src, self._readable)
            else:
                self._loop.remove_reader(self._src)
            self._reading = reading
        if writing != self._writing:
            if writing:
                self._loop.add_writer(self._dst, self._writable)
            else:
                self._loop.remove_writer(self._dst)
            self._writing = writing

    def _fail(self, *, source: bool, exc: OSError) -> None:
        self._set(reading=False, writing=False)
        if not self.done.done():
            failure = PeerFailed(source=source)
            failure.__cause__ = exc
            self.done.set_exception(failure)

    def _room(self) -> int:
        if self._pending:
            return 0
        if self._pipe is None:
            return BANNER_SNIFF_BYTES if self._flow.sniffing else PIPE_SIZE
        return self._pipe[2] - self._in_pipe

    def _read(self, room: int) -> int | None:
        """Read up to ``room`` bytes into the pipe (or ``_pending`` while sniffing): how many
        (0 at EOF), or None when the source has nothing.

        Raises:
            OSError: the source failed.
        """
        if self._pipe is None and not self._flow.sniffing:
            self._pipe = _pipe()
            room = self._room()
        try:
            if self._pipe is None:
                data = os.read(self._src, room)
                self._flow.observe(data)
                self._pending = data
                count = len(data)
            else:
                count = os.splice(self._src, self._pipe[1], room, flags=os.SPLICE_F_NONBLOCK)
                self._flow.moved(count)
                self._in_pipe += count
        except BlockingIOError:
            return None
        self._eof = count == 0
        return count

    def _write(self) -> bool:
        """Move what was read to the destination until it is full; False if it failed."""
        try:
            while self._pending:
                self._pending = self._pending[os.write(self._dst, self._pending) :]
            while self._in_pipe:
                assert self._pipe is not None
                self._in_pipe -= os.splice(
                    self._pipe[0], self._dst, self._in_pipe, flags=os.SPLICE_F_NONBLOCK
                )
        except BlockingIOError:
            pass
        except OSError as exc:
            self._fail(source=False, exc=exc)
            return False
        return True

    def _readable(self) -> None:
        for _ in range(ROUNDS):
            room = self._room()
            try:
                count = self._read(room)
            except OSError as exc:
                self._fail(source=True, exc=exc)
                return
            if count is None:
                break
            if not self._write():
                return
            if count < room or not self._room():  # drained (or EOF), or the pipe is full
                break
        self._update()

    def _writable(self) -> None:
        if self._write():
            self._update()

    def _update(self) -> None:
        """Register for what can happen next, or end at EOF once everything is written."""
        left = bool(self._pending or self._in_pipe)
        if self._eof and not left:
            self._set(reading=False, writing=False)
            with contextlib.suppress(OSError):  # the peer may be gone already
                self._dst_socket.shutdown(socket.SHUT_WR)
            if not self.done.done():
                self.done.set_result(None)
            return
        self._set(reading=not self._eof and self._room() > 0, writing=left)


async def splice_pump(src: socket.socket, dst: socket.socket, flow: Flow) -> None:
    """Relay ``src`` into ``dst`` until EOF, then half-close ``dst``.

    Raises:
        PeerFailed: reading or writing failed (reset, broken pipe).
    """
    direction = _Direction(src, dst, flow)
    direction.start()
    try:
        await direction.done
    finally:
        direction.stop()
