"""What the relay can read of an SSH connection before it is encrypted (RFC 4253).

Until the first SSH_MSG_NEWKEYS a connection is plaintext: optional text lines, the
identification line (``SSH-2.0-...``), then binary packets (uint32 length, byte padding
length, payload whose first byte is the message number, padding; no MAC yet).
:class:`KexWatch` follows one direction of that byte stream without buffering packets, so
the relay knows whether a client has finished its key exchange (a real login) or is still
before it (perhaps a squatter holding a slot). :func:`disconnect_message` builds the
plaintext refusal an SSH client prints.
"""

from __future__ import annotations

import struct
from enum import StrEnum

BANNER_SNIFF_BYTES = 1024  # SSH allows lines before the identification string; 255 max each
MAX_PACKET = 35000  # RFC 4253 6.1: every implementation must take packets of this size
MSG_DISCONNECT = 1
MSG_NEWKEYS = 21
DISCONNECT_REASON = 2  # SSH_DISCONNECT_PROTOCOL_ERROR; OpenSSH prints any reason with its text
GATEWAY_BANNER = b"SSH-2.0-sandman\r\n"


class Phase(StrEnum):
    BANNER = "banner"  # before the identification line
    KEX = "kex"  # plaintext packets: the key exchange is under way
    DONE = "done"  # NEWKEYS seen: from here on the stream is encrypted
    NOT_SSH = "not_ssh"  # no identification line, or a packet no SSH peer would send


class KexWatch:
    """Follows one direction up to its NEWKEYS; :meth:`feed` takes the bytes in order.

    It keeps at most :data:`BANNER_SNIFF_BYTES` of text while looking for the
    identification line and 6 bytes of each packet's head, so its memory is bounded
    whatever the peer sends.
    """

    def __init__(self) -> None:
        self.phase = Phase.BANNER
        self.banner: str | None = None
        self._text = b""  # lines before the identification line (and the start of it)
        self._seen_text = 0
        self._head = b""  # the current packet's first bytes (length, padding, message)
        self._skip = 0  # bytes of the current packet still to pass over

    @property
    def watching(self) -> bool:
        """True while more bytes can change what is known (banner or key exchange)."""
        return self.phase in (Phase.BANNER, Phase.KEX)

    def feed(self, data: bytes) -> None:
        view = memoryview(data)
        while view and self.watching:
            view = self._banner(view) if self.phase is Phase.BANNER else self._packets(view)

    def _banner(self, view: memoryview) -> memoryview:
        room = BANNER_SNIFF_BYTES - self._seen_text
        chunk = bytes(view[:room])
        newline = chunk.find(b"\n")
        if newline < 0:
            self._text += chunk
            self._seen_text += len(chunk)
            if self._seen_text >= BANNER_SNIFF_BYTES:
                self.phase = Phase.NOT_SSH
            return view[len(chunk) :]
        line = self._text + chunk[:newline]
        self._seen_text += newline + 1
        self._text = b""
        if line.startswith(b"SSH-"):
            self.banner = line.rstrip(b"\r").decode("ascii", "replace")[:255]
            self.phase = Phase.KEX
        elif self._seen_text >= BANNER_SNIFF_BYTES:
            self.phase = Phase.NOT_SSH
        return view[newline + 1 :]

    def _packets(self, view: memoryview) -> memoryview:
        if self._skip:
            step = min(self._skip, len(view))
            self._skip -= step
            return view[step:]
        need = 6 - len(self._head)
        self._head += bytes(view[:need])
        view = view[need:]
        if len(self._head) < 6:
            return view
        length, padding, message = struct.unpack(">IBB", self._head)
        self._head = b""
        if not 5 <= length <= MAX_PACKET or padding >= length:
            self.phase = Phase.NOT_SSH
        elif message == MSG_NEWKEYS:
            self.phase = Phase.DONE
        self._skip = length - 2  # the padding byte and the message number are read
        return view


def disconnect_message(description: str) -> bytes:
    """Our identification line, then a plaintext SSH_MSG_DISCONNECT saying ``description``.

    Sent before any key exchange, it needs no host key: OpenSSH prints it as
    ``Received disconnect from HOST port PORT:2: DESCRIPTION`` without ``-v``, also
    under ``StrictHostKeyChecking=yes``.
    """
    text = description.encode()
    payload = struct.pack(">BI", MSG_DISCONNECT, DISCONNECT_REASON)
    payload += struct.pack(">I", len(text)) + text + struct.pack(">I", 0)  # no language tag
    padding = 8 - (5 + len(payload)) % 8
    if padding < 4:
        padding += 8
    packet = struct.pack(">IB", 1 + len(payload) + padding, padding) + payload + b"\0" * padding
    return GATEWAY_BANNER + packet
