"""The gateway's SSH host identity: a host CA, a stable host key per user, host certificates.

On first start two secrets are created in the state directory, 0600: ``ssh_host_ca`` (the
ed25519 CA key, with ``ssh_host_ca.pub``) and ``ssh_host_key_seed`` (32 random bytes). A
user's host key is derived from the seed and the user name, so it is the same in every
session of that user and nothing per user is stored; each session gets a fresh certificate
of that key, signed by the CA, naming every host users may type. Users who trust the CA
(one ``@cert-authority`` line) never see a host-key prompt; users who don't still see one
stable key per user.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from pathlib import Path

import asyncssh
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from gateway.core.ssh import known_hosts_line
from gateway.errors import HostIdentityDamaged

CA_FILE = "ssh_host_ca"
SEED_FILE = "ssh_host_key_seed"
CA_COMMENT = "sandman-host-ca"
_DERIVATION_LABEL = b"sandman ssh host key v1\0"
SEED_BYTES = 32


@dataclass(frozen=True, slots=True)
class HostKeyFiles:
    """What a session container's sshd needs, in OpenSSH formats."""

    private_key: bytes
    public_key: bytes
    certificate: bytes


def create_secret(path: Path, content: bytes) -> None:
    """Write ``content`` to a new 0600 file, durably and all at once: a temporary file is
    written and fsynced, renamed into place, and the folder fsynced, so after a crash or
    power loss the file is either absent (and made again) or whole. An existing file is
    left as it is."""
    if path.exists():
        return
    temp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(content)
            file.flush()
            os.fsync(file.fileno())
        temp.replace(path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    folder = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


def _damaged(path: Path, problem: str) -> HostIdentityDamaged:
    return HostIdentityDamaged(
        f"{path} {problem}: restore it from a backup of the state directory, or remove it "
        "to make a new one (users' host keys and the CA they trust then change)"
    )


class HostIdentity:
    """The CA and the seed of user host keys. Build with :meth:`load_or_create`."""

    def __init__(self, ca: asyncssh.SSHKey, seed: bytes, hosts: tuple[str, ...]) -> None:
        if not hosts:
            raise ValueError("at least one host name is needed for host certificates")
        self._ca = ca
        self._seed = seed
        self.hosts = hosts
        self.ca_public_key = ca.export_public_key().decode().strip()
        self.known_hosts_line = known_hosts_line(hosts, self.ca_public_key)
        self.host_key = lru_cache(maxsize=4096)(self._derive_host_key)

    @classmethod
    def load_or_create(cls, state_dir: Path, hosts: tuple[str, ...]) -> HostIdentity:
        """Load the CA and seed from ``state_dir``, creating them (0600) on first start.

        Blocking file I/O: call it off the event loop.

        Raises:
            HostIdentityDamaged: the CA is not a private key, or the seed is not exactly
                :data:`SEED_BYTES` bytes (a short one, an empty one above all, would make
                every user's host key computable by anyone).
        """
        state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        ca_path, seed_path = state_dir / CA_FILE, state_dir / SEED_FILE
        if not ca_path.exists():
            ca = asyncssh.generate_private_key("ssh-ed25519", comment=CA_COMMENT)
            create_secret(ca_path, ca.export_private_key())
        create_secret(seed_path, secrets.token_bytes(SEED_BYTES))
        seed = seed_path.read_bytes()
        if len(seed) != SEED_BYTES:
            raise _damaged(seed_path, f"holds {len(seed)} bytes, not {SEED_BYTES}")
        try:
            ca = asyncssh.read_private_key(ca_path)
        except (asyncssh.KeyImportError, ValueError) as exc:
            raise _damaged(ca_path, f"is not a private key ({exc})") from None
        ca.set_comment(CA_COMMENT)
        pub_path = ca_path.with_name(CA_FILE + ".pub")
        if not pub_path.exists():
            pub_path.write_bytes(ca.export_public_key())
        return cls(ca, seed, hosts)

    def _derive_host_key(self, user_id: str) -> asyncssh.SSHKey:
        secret = hmac.new(self._seed, _DERIVATION_LABEL + user_id.encode(), hashlib.sha256)
        key = Ed25519PrivateKey.from_private_bytes(secret.digest())
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        )
        return asyncssh.import_private_key(pem)

    def fingerprint(self, user_id: str) -> str:
        """``SHA256:...`` of the user's host key, as ``ssh`` shows it."""
        return str(self.host_key(user_id).get_fingerprint("sha256"))

    @staticmethod
    def session_principal(session_id: str) -> str:
        """A principal only this session's certificate carries (the readiness check asks
        for it, so a stale container of the same user cannot pass for this one)."""
        return f"sandman-session-{session_id}"

    def certify(
        self, user_id: str, session_id: str, *, valid_after: datetime, valid_before: datetime
    ) -> HostKeyFiles:
        """The user's host key with a certificate for this session's principals."""
        key = self.host_key(user_id)
        cert = self._ca.generate_host_certificate(
            key,
            f"sandman:{user_id}:{session_id}",
            principals=[*self.hosts, self.session_principal(session_id)],
            valid_after=valid_after,
            valid_before=valid_before,
        )
        return HostKeyFiles(
            private_key=key.export_private_key(),
            public_key=key.export_public_key(),
            certificate=cert.export_certificate(),
        )

    def session_known_hosts(self, session_id: str) -> asyncssh.SSHKnownHosts:
        """known_hosts trusting the CA for this session's own principal only."""
        principal = self.session_principal(session_id)
        return asyncssh.import_known_hosts(f"@cert-authority {principal} {self.ca_public_key}\n")
