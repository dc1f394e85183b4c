"""The kernel data path (Linux): socket -> pipe -> socket with ``os.splice``, so relayed bytes
never enter Python.

Each direction is a small state machine driven by the event loop's reader and writer
callbacks on non-blocking sockets. A direction holds a pipe only while bytes are in it:
it takes one from a shared :class:`PipePool` to read and gives it back once the
destination has taken everything, so an idle connection holds its two sockets and
nothing else. The kernel fills a pipe by slots (one per socket buffer, however small),
not bytes: when splicing into the pipe says "try again" while bytes are in it, the pipe
is full, and the source is not read again until the destination has taken some
(backpressure without spinning). Until its key exchange is done (the plaintext start, see
:class:`~gateway.relay.pump.Flow`), a direction moves bytes with ordinary reads and
writes so they can be looked at; then it splices. Byte counts are splice's return
values. The source's EOF half-closes the destination.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import socket
import sys

from gateway.relay.pump import Flow, PeerFailed

AVAILABLE = sys.platform == "linux" and hasattr(os, "splice")
PIPE_SIZE = 1 << 20  # fewer wakeups per GiB; charged to the user's pipe budget while it exists
F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
F_GETPIPE_SZ = getattr(fcntl, "F_GETPIPE_SZ", 1032)
ROUNDS = 8  # splice in/out rounds per readiness callback, before yielding to other connections
SNIFF_READ = 32 * 1024  # one read while the plaintext start is looked at
POOL_IDLE = 8  # empty pipes kept for the next burst (each 2 fds)

_Pipe = tuple[int, int, int]  # read end, write end, capacity


class PipePool:
    """Empty pipes shared by the directions of many connections: :meth:`take` one to
    splice through, :meth:`give` it back empty. At most ``idle`` wait in the pool; the
    rest are closed, so pipes (fds and pipe budget) follow the bytes in flight."""

    def __init__(self, idle: int = POOL_IDLE) -> None:
        self._idle = idle
        self._free: list[_Pipe] = []

    def take(self) -> _Pipe:
        """An empty pipe, grown to :data:`PIPE_SIZE` where allowed.

        Raises:
            OSError: no pipe can be made (out of file descriptors).
        """
        if self._free:
            return self._free.pop()
        read_end, write_end = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        with contextlib.suppress(OSError):  # over the user's pipe-user-pages-soft, say
            fcntl.fcntl(write_end, F_SETPIPE_SZ, PIPE_SIZE)
        return read_end, write_end, fcntl.fcntl(write_end, F_GETPIPE_SZ)

    def give(self, pipe: _Pipe, *, empty: bool = True) -> None:
        """Return ``pipe``; one that may still hold bytes (``empty=False``) is closed."""
        if empty and len(self._free) < self._idle:
            self._free.append(pipe)
        else:
            os.close(pipe[0])
            os.close(pipe[1])

    @property
    def idle(self) -> int:
        return len(self._free)

    def close(self) -> None:
        while self._free:
            self.give(self._free.pop(), empty=False)


class _Direction:
    """One direction of a connection; ``done`` resolves at EOF or fails with PeerFailed.

    Reading is on while there is room: no looked-at bytes wait to be sent, and the pipe
    (if held) is not full; writing waits for the destination only while bytes are left.
    """

    def __init__(self, src: socket.socket, dst: socket.socket, flow: Flow, pool: PipePool) -> None:
        self._loop = asyncio.get_running_loop()
        self._src = src.fileno()
        self._dst = dst.fileno()
        self._dst_socket = dst
        self._flow = flow
        self._pool = pool
        self.done: asyncio.Future[None] = self._loop.create_future()
        self._pending = b""  # read while looking at the plaintext start, not yet sent
        self._pipe: _Pipe | None = None
        self._in_pipe = 0
        self._full = False  # splice into the pipe said "try again" while bytes were in it
        self._eof = False
        self._reading = False
        self._writing = False

    def start(self) -> None:
        self._set(reading=True, writing=False)

    def stop(self) -> None:
        self._set(reading=False, writing=False)
        if self._pipe is not None:
            self._pool.give(self._pipe, empty=not self._in_pipe)
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
        if self._pending or self._full:
            return 0
        if self._flow.sniffing:
            return SNIFF_READ
        if self._pipe is None:
            return PIPE_SIZE
        return self._pipe[2] - self._in_pipe

    def _read(self, room: int) -> int | None:
        """Read up to ``room`` bytes into the pipe (or ``_pending`` while sniffing): how many
        (0 at EOF), or None when nothing can be read now (the source is empty, or the
        pipe is full).

        Raises:
            OSError: the source failed.
        """
        try:
            if self._flow.sniffing:
                data = os.read(self._src, room)
                self._flow.observe(data)
                self._pending = data
                count = len(data)
            else:
                assert self._pipe is not None
                count = os.splice(self._src, self._pipe[1], room, flags=os.SPLICE_F_NONBLOCK)
                self._flow.moved(count)
                self._in_pipe += count
        except BlockingIOError:
            self._full = self._in_pipe > 0  # by slots: the pipe may be full below capacity
            self._release_if_empty()
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
                self._full = False  # slots were freed: the source may be read again
        except BlockingIOError:
            pass
        except OSError as exc:
            self._fail(source=False, exc=exc)
            return False
        self._release_if_empty()
        return True

    def _release_if_empty(self) -> None:
        if self._pipe is not None and not self._in_pipe:
            self._pool.give(self._pipe)
            self._pipe = None

    def _take_pipe(self) -> bool:
        """Hold a pipe before splicing; False (and the direction failed, by the gateway's
        side, not a peer's) if none can be made, e.g. out of file descriptors."""
        if self._pipe is None and not self._flow.sniffing:
            try:
                self._pipe = self._pool.take()
            except OSError as exc:
                self._set(reading=False, writing=False)
                if not self.done.done():
                    self.done.set_exception(exc)
                return False
        return True

    def _readable(self) -> None:
        for _ in range(ROUNDS):
            if not self._take_pipe():
                return
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


async def splice_pump(src: socket.socket, dst: socket.socket, flow: Flow, pool: PipePool) -> None:
    """Relay ``src`` into ``dst`` until EOF, then half-close ``dst``; pipes come from
    ``pool`` while bytes are in flight.

    Raises:
        PeerFailed: reading or writing failed (reset, broken pipe).
    """
    direction = _Direction(src, dst, flow, pool)
    direction.start()
    try:
        await direction.done
    finally:
        direction.stop()
