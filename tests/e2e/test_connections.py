"""Connections end to end: audit records, live TTL, warnings, PATCH, limits, metrics."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import time
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.conftest import logged_in, parse_time, wait_for

OPENSSH = "SSH-2.0-OpenSSH"


def ended_connections(gateway, session_id: str) -> list[dict]:
    body = gateway.request("GET", f"/sessions/{session_id}/connections").body
    return [c for c in body["connections"] if c["ended_at"] is not None]


def ssh_record(gateway, session_id: str) -> dict:
    """The ended record of the (one) connection made by the OpenSSH client."""
    found: list[dict] = []

    def ready() -> bool:
        found[:] = [
            c
            for c in ended_connections(gateway, session_id)
            if (c["client_banner"] or "").startswith(OPENSSH)
        ]
        return bool(found)

    try:
        wait_for(ready, timeout=15, what="the ssh connection's audit record")
    except AssertionError:
        body = gateway.request("GET", f"/sessions/{session_id}/connections").body
        raise AssertionError(f"no ended OpenSSH connection among {body}") from None
    return found[0]


def test_record_of_a_bulk_download(gateway, ssh):
    session = gateway.create(user_id="ivy").body
    result = ssh.with_key(session, "head -c 5000000 /dev/zero")
    assert result.returncode == 0 and len(result.stdout) == 5_000_000
    record = ssh_record(gateway, session["session_id"])
    assert record["reason"] == "client_closed" and record["closed_by"] == "client"
    assert record["bytes_container_to_client"] >= 5_000_000
    assert record["client_banner"].startswith(OPENSSH)
    assert record["server_banner"].startswith(OPENSSH)
    assert record["client_addr"] == "127.0.0.1" and record["duration_seconds"] > 0
    lines = [
        json.loads(line) for line in (gateway.state_dir / "audit.log").read_text().splitlines()
    ]
    disconnects = [
        e for e in lines if e["event"] == "disconnect" and e["connection_id"] == record["id"]
    ]
    assert len(disconnects) == 1
    assert disconnects[0]["bytes_container_to_client"] == record["bytes_container_to_client"]
    assert any(e["event"] == "connect" and e["connection_id"] == record["id"] for e in lines)


def test_live_connection_cut_at_expiry(gateway_factory, ssh):
    """The session's timer cuts at expiry; the sweep is its backstop, so the cut comes at
    most one sweep period late (plus the time ``ssh`` takes to exit), however loaded the
    host."""
    reap_interval = 2.0
    gateway = gateway_factory("--reap-interval", str(reap_interval))
    session = gateway.create(user_id="jay", ttl_seconds=6).body
    proc = logged_in(ssh, session)
    proc.wait(timeout=30)
    ended = time.time()
    expires = parse_time(session["expires_at"]).timestamp()
    assert expires <= ended < expires + reap_interval + 1
    record = ssh_record(gateway, session["session_id"])
    assert (record["reason"], record["closed_by"]) == ("ttl_expired", "gateway")
    wait_for(
        lambda: gateway.request("GET", f"/sessions/{session['session_id']}").status == 404,
        timeout=15,
        what="the expired session's cleanup",
    )


def test_live_connection_cut_on_delete_and_on_shutdown(gateway, ssh):
    deleted = gateway.create(user_id="kim").body
    proc = logged_in(ssh, deleted)
    gateway.request("DELETE", f"/sessions/{deleted['session_id']}")
    proc.wait(timeout=15)
    assert ssh_record(gateway, deleted["session_id"])["reason"] == "session_deleted"

    kept = gateway.create(user_id="lee").body
    proc = logged_in(ssh, kept)
    gateway.stop(signal.SIGTERM)
    proc.wait(timeout=15)
    gateway.start()
    assert ssh_record(gateway, kept["session_id"])["reason"] == "gateway_shutdown"
    assert ssh.with_key(kept, "true").returncode == 0  # the session itself survived


def test_interactive_terminal_gets_the_expiry_warning(gateway_factory, ssh):
    gateway = gateway_factory("--expiry-warning", "6s")
    session = gateway.create(user_id="mia", ttl_seconds=9).body
    proc = ssh.start_with_key(session, "sleep 30", tty=True)
    out, _ = proc.communicate(timeout=30)
    assert "Sandman: this session ends in" in out
    assert "Save your work" in out


def test_patch_keeps_a_session_past_its_first_expiry(gateway, ssh):
    session = gateway.create(user_id="ned", ttl_seconds=4).body
    url = f"/sessions/{session['session_id']}"
    patched = gateway.request("PATCH", url, {"extend_minutes": 1})
    assert patched.status == 200
    old_end = parse_time(session["expires_at"]).timestamp()
    assert parse_time(patched.body["expires_at"]).timestamp() - old_end == 60
    time.sleep(max(0.0, old_end - time.time()) + 1.5)  # past the old end
    assert gateway.request("GET", url).status == 200
    assert ssh.with_key(session, "true").returncode == 0
    too_long = gateway.request("PATCH", url, {"ttl_minutes": 100000})
    assert (too_long.status, too_long.body["code"]) == (400, "invalid_ttl")


def squat(port: int) -> socket.socket:
    """A connection that sends an identification line and then nothing, returned once the
    gateway relays it (the container's banner came back)."""
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(b"SSH-2.0-x\r\n")
    sock.settimeout(10)
    assert sock.recv(4096).startswith(b"SSH-2.0-OpenSSH")
    return sock


def test_squatters_cannot_lock_the_user_out(gateway_factory, ssh):
    """Every slot taken by silent connections from the user's own address: the user's own
    ``ssh`` still logs in at the first try, and the squatters are never recorded one by one
    (only counted, then summarised: the summary is written at the latest at shutdown)."""
    gateway = gateway_factory("--max-connections-per-session", "8")
    session = gateway.create(user_id="oda").body
    squatters = [squat(session["ssh_port"]) for _ in range(8)]
    login = ssh.with_key(session, "echo in")
    assert (login.returncode, login.stdout) == (0, "in\n"), login.stderr
    squatters[0].settimeout(10)
    while squatters[0].recv(4096):  # the most silent one made room: the gateway closes it
        pass
    ssh_record(gateway, session["session_id"])  # the login is recorded in full
    assert len(ended_connections(gateway, session["session_id"])) == 1  # and nothing else
    for sock in squatters:
        sock.close()
    gateway.stop()
    gateway.start()
    summaries = [
        e
        for e in gateway.request("GET", "/audit?limit=1000").body["events"]
        if e["event"] == "connections_before_kex"
    ]
    assert [(e["client_addr"], e["count"]) for e in summaries] == [("127.0.0.1", 8)], summaries
    assert summaries[0]["reasons"]["evicted"] == 1


def test_the_33rd_connection_is_told_why_it_is_refused(gateway, ssh, tmp_path):
    """32 logins hold every slot of a session (the default limit): the next ``ssh`` prints
    the reason without -v, even with strict host key checking and no known host."""
    session = gateway.create(user_id="oli").body
    fds = Path(f"/proc/{gateway.proc.pid}/fd")
    before = sum(1 for _ in fds.iterdir())
    logins = [logged_in(ssh, session) for _ in range(32)]
    per_login = (sum(1 for _ in fds.iterdir()) - before) / len(logins)
    print(f"\nfds per idle logged-in ssh connection: {per_login:.2f}")
    try:
        strict = [
            "ssh", "-p", str(session["ssh_port"]), "-o", "StrictHostKeyChecking=yes",
            "-o", f"UserKnownHostsFile={tmp_path / 'empty'}", "-o", "BatchMode=yes",
            "-i", str(ssh.save_key(session)), f"{session['ssh_user']}@127.0.0.1", "true",
        ]  # fmt: skip
        refused = subprocess.run(strict, capture_output=True, text=True, timeout=30)
    finally:
        for proc in logins:
            proc.kill()
            proc.wait()
    assert refused.returncode == 255
    assert (
        f"Received disconnect from 127.0.0.1 port {session['ssh_port']}:2: too many connections"
        " to this session (limit 32); close one or use ControlMaster" in refused.stderr
    ), refused.stderr
    assert per_login <= 2.5  # two sockets each; the few pooled pipes shared by all


def test_metrics_match_the_audit_records(gateway, ssh):
    session = gateway.create(user_id="pat").body
    for _ in range(2):
        assert ssh.with_key(session, "head -c 100000 /dev/urandom >/dev/null").returncode == 0
    gateway.request("DELETE", f"/sessions/{session['session_id']}")
    records = ended_connections(gateway, session["session_id"])
    # exactly the two logins: the readiness check is not a user connection
    assert len(records) == 2
    assert all(r["client_banner"].startswith("SSH-2.0-OpenSSH") for r in records)

    text = gateway.request("GET", "/metrics").body
    families = {f.name: f for f in text_string_to_metric_families(text)}
    ended = {
        s.labels["reason"]: s.value
        for s in families["sandman_connections_ended"].samples
        if s.name.endswith("_total")
    }
    for reason in {r["reason"] for r in records}:
        assert ended[reason] == sum(r["reason"] == reason for r in records)
    assert sum(ended.values()) == len(records)
    relayed = {
        s.labels["direction"]: s.value
        for s in families["sandman_relayed_bytes"].samples
        if s.name.endswith("_total")
    }
    assert relayed["up"] == sum(r["bytes_client_to_container"] for r in records)
    assert relayed["down"] == sum(r["bytes_container_to_client"] for r in records)
    assert families["sandman_sessions_live"].samples[0].value == 0
    created = [
        s for s in families["sandman_session_create_seconds"].samples if s.name.endswith("_count")
    ]
    assert created[0].value == 1
