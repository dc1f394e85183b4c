"""SSH identity with the real OpenSSH client: the host CA line, stable per-user host keys and
ports, the caller's own keys, and authorized keys that expire with the session (issue 7)."""

from __future__ import annotations

import re
import subprocess
import time
from datetime import UTC, datetime
from pathlib import Path

from tests.e2e.conftest import docker, parse_time, wait_for


def known_hosts_from_gateway(gateway, path: Path) -> Path:
    response = gateway.request("GET", "/ssh/known_hosts", token=None)  # public
    assert response.status == 200
    line = response.body.strip()
    assert re.fullmatch(
        r"@cert-authority 127\.0\.0\.1,\[127\.0\.0\.1\]:\* ssh-ed25519 \S+ sandman-host-ca", line
    ), line
    path.write_text(line + "\n")
    return path


def keyscan_fingerprint(port: int) -> str:
    scan = subprocess.run(
        ["ssh-keyscan", "-t", "ed25519", "-p", str(port), "127.0.0.1"],
        capture_output=True,
        text=True,
        check=True,
    )
    listed = subprocess.run(
        ["ssh-keygen", "-lf", "-"], input=scan.stdout, capture_output=True, text=True, check=True
    )
    return listed.stdout.split()[1]


def test_ca_line_lets_every_session_in_with_strict_checking(gateway_factory, ssh, tmp_path):
    gateway = gateway_factory(start=False)
    gateway.extra_args += ["--ssh-port-end", str(gateway.port_start)]  # one port for all
    gateway.start()
    known_hosts = known_hosts_from_gateway(gateway, tmp_path / "known_hosts")
    before = known_hosts.read_text()

    ports = []
    for user in ("alice", "alice", "bob"):  # two sessions of one user, then another user
        created = gateway.create(user_id=user, ttl_minutes=5)
        assert created.status == 201, created.body
        session = created.body
        assert session["ssh_known_hosts"] == before.strip()
        assert session["ssh_command"] == f"ssh -p {session['ssh_port']} {user}@127.0.0.1"
        result = ssh.login(
            user,
            session["ssh_port"],
            "whoami",
            key_file=ssh.save_key(session),
            known_hosts=known_hosts,
        )
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == user
        assert keyscan_fingerprint(session["ssh_port"]) == session["ssh_host_key_fingerprint"]
        ports.append(session["ssh_port"])
        assert gateway.request("DELETE", f"/sessions/{session['session_id']}").status == 200
    assert len(set(ports)) == 1
    assert known_hosts.read_text() == before  # nothing was ever added or asked


def test_without_the_ca_line_a_user_keeps_port_and_host_key(gateway, ssh, tmp_path):
    known_hosts = tmp_path / "known_hosts"
    seen = []
    for _ in range(3):
        session = gateway.create(user_id="carol", ttl_minutes=5).body
        result = ssh.login(
            "carol",
            session["ssh_port"],
            "true",
            key_file=ssh.save_key(session),
            known_hosts=known_hosts,
            strict="accept-new",
        )
        assert result.returncode == 0, result.stderr
        seen.append((session["ssh_port"], session["ssh_host_key_fingerprint"]))
        assert gateway.request("DELETE", f"/sessions/{session['session_id']}").status == 200
    assert len(set(seen)) == 1
    assert len(known_hosts.read_text().splitlines()) == 1  # the plain key, learnt once

    other = gateway.create(user_id="dan", ttl_minutes=5).body
    assert other["ssh_port"] != seen[0][0]  # carol's port stays hers while others are free
    assert other["ssh_host_key_fingerprint"] != seen[0][1]


def test_own_public_key_logs_in_and_no_private_key_is_made(gateway, ssh, tmp_path):
    key = tmp_path / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", key], check=True)
    public = (tmp_path / "id_ed25519.pub").read_text().strip()

    bad = gateway.create(user_id="erin", ssh_public_keys=[public, "ssh-rsa AAAAnotakey"])
    assert bad.status == 400 and bad.body["code"] == "invalid_public_key", bad.body
    assert "ssh_public_keys[1]" in bad.body["error"]
    assert gateway.containers("label=sandman.user_id=erin") == []

    created = gateway.create(user_id="erin", ssh_public_keys=[public])
    assert created.status == 201, created.body
    session = created.body
    assert session["ssh_private_key"] is None
    known_hosts = known_hosts_from_gateway(gateway, tmp_path / "known_hosts")
    result = ssh.login("erin", session["ssh_port"], "id -un", key_file=key, known_hosts=known_hosts)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "erin"

    # one ssh is exactly one connection record: nothing the gateway does is counted
    def one_ended() -> bool:
        body = gateway.request("GET", f"/sessions/{session['session_id']}/connections").body
        return body["count"] == 1 and body["connections"][0]["ended_at"] is not None

    wait_for(one_ended, timeout=10, what="the login's connection record")


def authorized_expiry(container_id: str, user: str) -> datetime:
    text = docker("exec", container_id, "cat", f"/etc/ssh/authorized_keys/{user}")
    (stamp,) = set(re.findall(r'expiry-time="(\d{14})Z"', text))
    return datetime.strptime(stamp, "%Y%m%d%H%M%S").replace(tzinfo=UTC)


def test_keys_expire_with_the_session_and_follow_patch(gateway, ssh):
    session = gateway.create(user_id="fay", ttl_minutes=5).body
    cid = session["container_id"]
    assert authorized_expiry(cid, "fay") == parse_time(session["expires_at"])
    modes = docker(
        "exec",
        cid,
        "stat",
        "-c",
        "%n %a %U",
        *("/etc/ssh/ssh_host_ed25519_key", "/etc/sandman/password-hash"),
    ).splitlines()
    assert modes == [
        "/etc/ssh/ssh_host_ed25519_key 600 root",
        "/etc/sandman/password-hash 600 root",
    ]
    env = docker("inspect", "-f", "{{json .Config.Env}}", cid)
    assert "KEY" not in env and "HASH" not in env and "$2b$" not in env

    patched = gateway.request("PATCH", f"/sessions/{session['session_id']}", {"extend_minutes": 30})
    assert patched.status == 200
    new_expiry = parse_time(patched.body["expires_at"])
    wait_for(
        lambda: authorized_expiry(cid, "fay") == new_expiry,
        timeout=5,
        what="the authorized keys to follow the PATCH",
    )
    assert ssh.with_key(session, "true").returncode == 0


def test_an_expired_key_is_refused_even_if_the_container_lives_on(gateway, ssh):
    session = gateway.create(user_id="gus", ttl_seconds=6).body
    ip = gateway.request("GET", f"/sessions/{session['session_id']}").body["container_ip"]
    key = ssh.save_key(session)
    direct = [
        *("ssh", "-i", str(key), "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes"),
        *("-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null"),
        f"gus@{ip}",
        "true",
    ]
    assert subprocess.run(direct, capture_output=True, timeout=30).returncode == 0
    gateway.stop()  # a clean stop keeps the container: nothing will end it on time
    expires = parse_time(session["expires_at"]).timestamp()
    time.sleep(max(0.0, expires - time.time() + 1.5))  # the container's clock must pass it
    refused = subprocess.run(direct, capture_output=True, text=True, timeout=30)
    assert refused.returncode == 255 and "Permission denied" in refused.stderr, refused.stderr
