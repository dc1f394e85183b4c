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
import os
import socket
import sys

from gateway.relay.pump import BANNER_SNIFF_BYTES, Flow, PeerFailed

AVAILABLE = sys.platform == "linux" and hasattr(os, "splice")
ROUNDS = 8  # splice in/out rounds per readiness callback, before yielding to other connections


class _Direction:
    """One direction of a connection; ``done`` resolves at EOF or fails with PeerFailed."""

    def __init__(self, src: socket.socket, dst: socket.socket, flow: Flow) -> None:
        self._loop = asyncio.get_running_loop()
        self._src = src.fileno()
        self._dst = dst.fileno()
        self._dst_socket = dst
        self._flow = flow
        self.done: asyncio.Future[None] = self._loop.create_future()
        self._pending = b""  # read by recv while sniffing the banner, not yet sent
        self._pipe: tuple[int, int] | None = None
        self._in_pipe = 0
        self._eof = False
        self._reading = False
        self._writing = False

    def start(self) -> None:
        self._set(reading=True, writing=False)

    def stop(self) -> None:
        self._set(reading=False, writing=False)
        if self._pipe is not None:
            for fd in self._pipe:
                os.close(fd)
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
                self._loop.add_writer(self._dst, self._flush)
            else:
                self._loop.remove_writer(self._dst)
            self._writing = writing

    def _fail(self, *, source: bool, exc: OSError) -> None:
        self._set(reading=False, writing=False)
        if not self.done.done():
            failure = PeerFailed(source=source)
            failure.__cause__ = exc
            self.done.set_exception(failure)

    def _read(self) -> bool:
        """Read once into the pipe (or ``_pending``); False when the source has nothing."""
        try:
            if self._flow.sniffing:
                data = os.read(self._src, BANNER_SNIFF_BYTES)
                self._flow.observe(data)
                self._pending = data
                count = len(data)
            else:
                if self._pipe is None:
                    self._pipe = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
                count = os.splice(self._src, self._pipe[1], 1 << 20, flags=os.SPLICE_F_NONBLOCK)
                self._flow.moved(count)
                self._in_pipe = count
        except BlockingIOError:
            return False
        if count == 0:
            self._eof = True
        return True

    def _write(self) -> None:
        """Move what was read to the destination; BlockingIOError while it is full."""
        while self._pending:
            sent = os.write(self._dst, self._pending)
            self._pending = self._pending[sent:]
        while self._in_pipe:
            assert self._pipe is not None
            self._in_pipe -= os.splice(
                self._pipe[0], self._dst, self._in_pipe, flags=os.SPLICE_F_NONBLOCK
            )

    def _readable(self) -> None:
        for _ in range(ROUNDS):
            try:
                if not self._read():
                    return
            except OSError as exc:
                self._fail(source=True, exc=exc)
                return
            if not self._flush() or self._eof:
                return

    def _flush(self) -> bool:
        """Write out; wait for the destination when it is full; True when all is written."""
        flushed = True
        try:
            self._write()
        except BlockingIOError:
            flushed = False
        except OSError as exc:
            self._fail(source=False, exc=exc)
            return False
        if not flushed:
            self._set(reading=False, writing=True)
        elif self._eof:
            self._set(reading=False, writing=False)
            with contextlib.suppress(OSError):
                self._dst_socket.shutdown(socket.SHUT_WR)
            if not self.done.done():
                self.done.set_result(None)
        else:
            self._set(reading=True, writing=False)
        return flushed


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
