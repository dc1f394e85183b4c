"""Per-session login secrets: an ed25519 key pair and a random password with its bcrypt hash."""

from __future__ import annotations

import secrets

import bcrypt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from gateway.models import Credentials

PASSWORD_BYTES = 18  # 24 url-safe characters


def new_credentials(comment: str) -> Credentials:
    """Generate fresh credentials. Costs a bcrypt round (~50 ms): call it off the event loop."""
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
    password = secrets.token_urlsafe(PASSWORD_BYTES)
    password_hash = bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=10)).decode()
    return Credentials(
        private_key=private_key,
        public_key=f"{public_key} {comment}",
        password=password,
        password_hash=password_hash,
    )
