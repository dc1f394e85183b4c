"""Per-session login secrets: the caller's own public keys, or a generated ed25519 key pair;
and a random password with its bcrypt hash."""

from __future__ import annotations

import secrets
from collections.abc import Sequence

import asyncssh
import bcrypt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from gateway.errors import InvalidPublicKey

PASSWORD_BYTES = 18  # 24 url-safe characters
MAX_PUBLIC_KEYS = 16
MIN_RSA_BITS = 3072
#: Key types a caller may bring (certificates and DSA are not accepted).
ACCEPTED_KEY_TYPES = frozenset(
    {
        "ssh-ed25519",
        "ssh-rsa",
        "ecdsa-sha2-nistp256",
        "ecdsa-sha2-nistp384",
        "ecdsa-sha2-nistp521",
        "sk-ssh-ed25519@openssh.com",
        "sk-ecdsa-sha2-nistp256@openssh.com",
    }
)


def parse_public_key(line: str) -> str:
    """Validate one OpenSSH public key line; return it as ``type base64`` (no comment, no
    options), ready for authorized_keys.

    Raises:
        ValueError: not one accepted key, or an RSA key under 3072 bits.
    """
    fields = line.strip().split()
    if "\n" in line.strip() or len(fields) < 2:
        raise ValueError("not a single OpenSSH public key line ('TYPE BASE64 [COMMENT]')")
    if fields[0] not in ACCEPTED_KEY_TYPES:
        raise ValueError(
            f"key type {fields[0][:40]!r} is not accepted "
            f"(use one of {', '.join(sorted(ACCEPTED_KEY_TYPES))})"
        )
    try:
        key = asyncssh.import_public_key(f"{fields[0]} {fields[1]}")
    except (asyncssh.KeyImportError, ValueError):
        raise ValueError("the key data does not decode as a public key") from None
    if fields[0] == "ssh-rsa":
        bits = key.pyca_key.key_size
        if bits < MIN_RSA_BITS:
            raise ValueError(f"RSA keys need at least {MIN_RSA_BITS} bits, this one has {bits}")
    key.set_comment(None)
    return key.export_public_key().decode().strip()


def parse_public_keys(lines: Sequence[object]) -> tuple[str, ...]:
    """Validate ``ssh_public_keys`` of a request; duplicates are dropped.

    Raises:
        InvalidPublicKey: an empty list, more than 16, or a bad line (named by its index).
    """
    if not 1 <= len(lines) <= MAX_PUBLIC_KEYS:
        raise InvalidPublicKey(f"ssh_public_keys must hold 1 to {MAX_PUBLIC_KEYS} keys")
    keys: list[str] = []
    for index, line in enumerate(lines):
        if not isinstance(line, str):
            raise InvalidPublicKey(f"ssh_public_keys[{index}] must be a string")
        try:
            keys.append(parse_public_key(line))
        except ValueError as exc:
            raise InvalidPublicKey(f"ssh_public_keys[{index}]: {exc}") from None
    return tuple(dict.fromkeys(keys))


def new_password() -> tuple[str, str]:
    """A random password and its bcrypt hash. Costs a bcrypt round (~50 ms): call it off
    the event loop."""
    password = secrets.token_urlsafe(PASSWORD_BYTES)
    return password, bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=10)).decode()


def new_key_pair(public_keys: tuple[str, ...] = ()) -> tuple[str | None, tuple[str, ...]]:
    """(private key, public keys): ``public_keys`` when the caller brought them (no private
    key is made), else a fresh ed25519 pair (fast enough for the event loop)."""
    if public_keys:
        return None, public_keys
    key = Ed25519PrivateKey.generate()
    private_key = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    ).decode()
    public_key = (
        key.public_key()
        .public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        .decode()
    )
    return private_key, (public_key,)
