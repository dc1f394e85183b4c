"""The plaintext start of an SSH connection, as the relay reads it (tables, no sockets)."""

from __future__ import annotations

import struct

import pytest

from gateway.core.ssh_transport import (
    BANNER_SNIFF_BYTES,
    GATEWAY_BANNER,
    KexWatch,
    Phase,
    disconnect_message,
)
from tests.unit.helpers import CLIENT_BANNER, CLIENT_KEX, packet

KEXINIT = packet(20, b"k" * 300)


@pytest.mark.parametrize(
    ("stream", "phase", "banner"),
    [
        (b"", Phase.BANNER, None),
        (CLIENT_BANNER, Phase.KEX, "SSH-2.0-OpenSSH_9.2p1"),
        (b"hello\r\nworld\n" + CLIENT_BANNER, Phase.KEX, "SSH-2.0-OpenSSH_9.2p1"),
        (CLIENT_BANNER + KEXINIT, Phase.KEX, "SSH-2.0-OpenSSH_9.2p1"),
        (CLIENT_KEX, Phase.DONE, "SSH-2.0-OpenSSH_9.2p1"),
        (CLIENT_KEX + b"\xff" * 64, Phase.DONE, "SSH-2.0-OpenSSH_9.2p1"),  # encrypted after
        (CLIENT_BANNER + KEXINIT[:3], Phase.KEX, "SSH-2.0-OpenSSH_9.2p1"),
        (b"x" * BANNER_SNIFF_BYTES, Phase.NOT_SSH, None),  # no line at all
        (b"line\n" * (BANNER_SNIFF_BYTES // 5 + 1), Phase.NOT_SSH, None),  # lines, never SSH-
        (CLIENT_BANNER + b"x" * 100, Phase.NOT_SSH, "SSH-2.0-OpenSSH_9.2p1"),  # absurd length
        (CLIENT_BANNER + struct.pack(">IBB", 12, 12, 20), Phase.NOT_SSH, "SSH-2.0-OpenSSH_9.2p1"),
        (CLIENT_BANNER + struct.pack(">IBB", 1, 0, 0), Phase.NOT_SSH, "SSH-2.0-OpenSSH_9.2p1"),
    ],
)
def test_phase_after_a_stream(stream, phase, banner):
    whole, bytewise = KexWatch(), KexWatch()
    whole.feed(stream)
    for i in range(len(stream)):  # the same stream one byte per read
        bytewise.feed(stream[i : i + 1])
    for watch in (whole, bytewise):
        assert (watch.phase, watch.banner) == (phase, banner)
        assert watch.watching == (phase in (Phase.BANNER, Phase.KEX))


def test_a_long_banner_is_cut_at_255_characters():
    watch = KexWatch()
    watch.feed(b"SSH-2.0-" + b"v" * 400 + b"\r\n")
    assert watch.banner is not None and len(watch.banner) == 255


def test_disconnect_message_is_a_well_formed_plaintext_packet():
    text = "too many connections to this session (limit 32); close one or use ControlMaster"
    message = disconnect_message(text)
    assert message.startswith(GATEWAY_BANNER)
    body = message[len(GATEWAY_BANNER) :]
    length, padding = struct.unpack(">IB", body[:5])
    assert len(body) == 4 + length and len(body) % 8 == 0 and padding >= 4
    payload = body[5 : 4 + length - padding]
    assert struct.unpack(">BII", payload[:9]) == (1, 2, len(text.encode()))
    assert payload[9:] == text.encode() + b"\0\0\0\0"  # the description, no language tag
