"""Faults with real processes and real Docker (issue 10): SIGKILL at every create step,
SIGTERM, a Docker engine that goes away and comes back, a crash during a write burst, and
databases from another schema version."""

from __future__ import annotations

import concurrent.futures
import signal
import socket
import sqlite3
import struct
import threading
import time
from functools import partial
from pathlib import Path

import pytest

from gateway.sessions import CREATE_STEPS, WATCH_RETRY_SECONDS
from gateway.store.migrations import MIGRATIONS, SCHEMA_VERSION
from tests.e2e.conftest import (
    Gateway,
    docker,
    holdings,
    logged_in,
    parse_time,
    port_refuses,
    wait_for,
)

ONE_A100 = {"host": "e2e", "gpus": [{"model": "A100-80GB", "mig": True}]}
KILLS_PER_STEP = 3  # 7 steps: 21 kills
RECOVERED_STEPS = {"marked_running", "created"}  # the row says running: the restart adopts it


def stopped(pid: int) -> bool:
    """Whether the process stopped itself (state T), as SANDMAN_TEST_STOP_AT makes it."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat.rsplit(") ", 1)[1].startswith("T")


def _answered_or_stopped(answer: concurrent.futures.Future, pid: int) -> bool:
    return answer.done() or stopped(pid)


def last_step_logged(gateway: Gateway) -> str:
    marks = [line for line in gateway.log_path.read_text().splitlines() if "create step" in line]
    return marks[-1].split("create step ")[1].split()[0]


def mig_instances(gateway: Gateway) -> set[str]:
    gpus = gateway.request("GET", "/gpus").body["gpus"]
    return {i["uuid"] for gpu in gpus for i in gpu["mig_instances"]}


def assert_nothing_leaked(gateway: Gateway, *, sessions: int) -> None:
    """Rows, labelled containers, listeners and MIG instances agree, with ``sessions`` each."""
    held = holdings(gateway)
    assert held.consistent and len(held.rows) == sessions, held
    assert mig_instances(gateway) == held.slices, held  # dynamic MIG: one instance per row


def restart_and_check_what_the_kill_left(gateway: Gateway, *, stop_at: str) -> None:
    """Start the gateway (to stop itself at ``stop_at`` this time). It must have recovered
    what the last kill left: nothing leaked, and a session whose row said running adopted;
    that one is then deleted, and ends cleanly."""
    gateway.env["SANDMAN_TEST_STOP_AT"] = stop_at
    gateway.start()
    previous = gateway.request("GET", "/sessions").body
    assert_nothing_leaked(gateway, sessions=len(previous))
    if previous:
        assert [s["state"] for s in previous] == ["running"]
        gateway.request("DELETE", f"/sessions/{previous[0]['id']}")
        assert_nothing_leaked(gateway, sessions=0)


def kill_during_a_create_at(gateway: Gateway, step: str) -> None:
    """POST a session for kim, wait until the gateway stops itself at ``step``, SIGKILL it
    there: no 201 got out, and the row is in the state that step leaves it in."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        answer = pool.submit(gateway.create, user_id="kim", ttl_minutes=5)
        assert gateway.proc is not None
        pid = gateway.proc.pid
        wait_for(partial(_answered_or_stopped, answer, pid), timeout=60, what=step)
        assert not answer.done(), answer.result()  # the same user got this far again
        assert last_step_logged(gateway) == step
        gateway.stop(signal.SIGKILL)
        with pytest.raises(OSError):  # no answer: the process died before the 201
            answer.result()
    left = set(_row_states(gateway).values())  # the row was written at the first step
    assert left == {"running" if step in RECOVERED_STEPS else "starting"}, (step, left)


def test_sigkill_at_every_create_step_leaks_nothing(gateway_factory, topology, ssh):
    gateway = gateway_factory(
        "--gpus", topology(ONE_A100), "--mig-dynamic", "--default-mig-profile", "1g.10gb",
        start=False,
    )  # fmt: skip
    started = time.monotonic()
    kills = 0
    for step in CREATE_STEPS * KILLS_PER_STEP:
        restart_and_check_what_the_kill_left(gateway, stop_at=step)
        kill_during_a_create_at(gateway, step)
        kills += 1

    # the last restart, with no stop: everything left is ended, and kim logs in again
    del gateway.env["SANDMAN_TEST_STOP_AT"]
    gateway.start()
    left = gateway.request("GET", "/sessions").body
    for session in left:
        gateway.request("DELETE", f"/sessions/{session['id']}")
    assert_nothing_leaked(gateway, sessions=0)
    created = gateway.create(user_id="kim", ttl_minutes=5)
    assert created.status == 201, created.body
    assert ssh.with_key(created.body, "true").returncode == 0
    assert_nothing_leaked(gateway, sessions=1)
    print(f"\n{kills} kills over {len(CREATE_STEPS)} steps in {time.monotonic() - started:.1f} s")


def _row_states(gateway: Gateway) -> dict[str, str]:
    return dict(gateway.query("SELECT id, state FROM sessions"))


def test_a_port_taken_during_a_restart_moves_the_session_and_its_job_goes_on(gateway, ssh):
    """Another process binds the session's port while the gateway is down: the restart puts
    the session on another port instead of ending it, and the user's job still runs."""
    session = gateway.create(user_id="pia", ttl_minutes=10).body
    job = "setsid sleep 600 </dev/null >/dev/null 2>&1 & echo started"
    assert ssh.with_key(session, job).stdout.strip() == "started"
    gateway.stop()
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", session["ssh_port"]))
        squatter.listen()
        gateway.start()
        view = gateway.request("GET", f"/sessions/{session['session_id']}").body
    assert view["state"] == "running" and view["ssh_port"] != session["ssh_port"]
    assert view["container_id"] == session["container_id"]
    moved = {**session, "ssh_port": view["ssh_port"]}
    running = ssh.with_key(moved, "cat /proc/[0-9]*/comm")
    assert running.returncode == 0 and "sleep" in running.stdout.split(), running.stderr
    events = gateway.request("GET", f"/audit?session_id={session['session_id']}").body["events"]
    (event,) = [e for e in events if e["event"] == "session_port_moved"]
    assert (event["previous_ssh_port"], event["ssh_port"]) == (
        session["ssh_port"],
        moved["ssh_port"],
    )
    assert holdings(gateway).consistent


def test_sigterm_cuts_connections_keeps_sessions_and_the_next_start_resumes(gateway, ssh):
    short = gateway.create(user_id="amy", ttl_seconds=15).body  # expires after the restart
    long = gateway.create(user_id="bob", ttl_minutes=10).body
    logins = [logged_in(ssh, s) for s in (short, long)]
    before = holdings(gateway)
    assert before.consistent and len(before.rows) == 2

    assert gateway.proc is not None
    began = time.monotonic()
    gateway.proc.send_signal(signal.SIGTERM)
    code = gateway.proc.wait(timeout=10)
    took = time.monotonic() - began
    print(f"\nSIGTERM to exit: {took:.2f} s")
    assert took < 5 and code == 0
    gateway.proc = None
    for login in logins:
        login.wait(timeout=5)  # cut by the gateway
    said = gateway.log_path.read_text()  # what it did, for the operator
    assert "shutdown: cut 2 SSH connections (gateway_shutdown), closed 2 session ports" in said
    assert "2 sessions and their containers stay for the next start" in said
    assert "stopped: API and session ports closed" in said
    assert port_refuses(gateway.api_port)
    assert all(port_refuses(s["ssh_port"]) for s in (short, long))
    kept = holdings(gateway)
    assert kept.rows == before.rows and kept.containers == before.containers
    assert _row_states(gateway) == dict.fromkeys(before.rows, "running")
    for s in (short, long):
        assert docker("inspect", "-f", "{{.State.Running}}", s["container_id"]) == "true"

    gateway.start()
    assert holdings(gateway) == before
    listed = {s["id"]: s for s in gateway.request("GET", "/sessions").body}
    assert ssh.with_key(long, "true").returncode == 0
    for s in (short, long):
        assert listed[s["session_id"]]["expires_at"] == s["expires_at"]
        events = gateway.request("GET", f"/audit?session_id={s['session_id']}").body["events"]
        cut = [e["reason"] for e in events if e["event"] == "disconnect"]
        assert "gateway_shutdown" in cut
        assert "session_recovered" in {e["event"] for e in events}
    url = f"/sessions/{short['session_id']}"
    wait_for(lambda: gateway.request("GET", url).status == 404, timeout=20, what="the TTL")
    # its own expiry, kept across the restart
    assert time.time() >= parse_time(short["expires_at"]).timestamp()
    assert gateway.request("GET", f"/sessions/{long['session_id']}").status == 200


def test_docker_engine_away_and_back(gateway_factory, ssh, docker_proxy):
    gateway = gateway_factory("--reap-interval", "2", start=False)
    gateway.env["DOCKER_HOST"] = f"unix://{docker_proxy.path}"
    gateway.start()
    session = gateway.create(user_id="una", ttl_minutes=10).body
    ticker = ssh.start_with_key(session, "while sleep 0.2; do echo tick; done")
    assert ticker.stdout is not None and ticker.stdout.readline() == "tick\n"
    url = f"/sessions/{session['session_id']}"

    docker_proxy.stop()
    health = gateway.request("GET", "/healthz")
    assert health.status == 503 and "docker" in health.body["failing"], health.body
    refused = gateway.request("POST", "/sessions", {"user_id": "vic"})
    assert (refused.status, refused.body["code"]) == (503, "docker_unavailable")
    assert gateway.request("GET", url).body["state"] == "running"  # from the database
    assert gateway.request("GET", "/sessions").status == 200
    assert gateway.request("GET", f"{url}/connections").status == 200
    for _ in range(10):  # the live connection keeps flowing, new logins work
        assert ticker.stdout.readline() == "tick\n"
    assert ssh.with_key(session, "echo fine").stdout == "fine\n"
    # the sweep and the event watcher both fail meanwhile, and must survive it
    log_before = gateway.log_path.read_text()
    for failure in ("TTL sweep failed", "container events unavailable"):
        wait_for(
            lambda f=failure: gateway.log_path.read_text().count(f) > log_before.count(f),
            timeout=15,
            what=f"a fresh {failure!r} in the log",
        )

    docker_proxy.start()
    back = time.monotonic()
    wait_for(lambda: gateway.request("GET", "/healthz").status == 200, timeout=10, what="health")
    again = gateway.create(user_id="wes", ttl_minutes=10)
    assert again.status == 201, again.body

    def vic_creates() -> bool:  # its failed create's row was left ending, for the sweep
        return gateway.create(user_id="vic", ttl_minutes=10).status == 201

    wait_for(vic_creates, timeout=10, what="the failed create's cleanup")
    assert ticker.stdout.readline() == "tick\n" and ticker.poll() is None
    # the event watcher tries again every WATCH_RETRY_SECONDS: a whole period after the
    # engine came back, it follows the events again (Docker replays none it missed)
    time.sleep(max(0.0, back + WATCH_RETRY_SECONDS + 1 - time.monotonic()))
    docker("rm", "-f", session["container_id"])  # the event watcher followed the engine back
    wait_for(lambda: gateway.request("GET", url).status == 404, timeout=10, what="the end")
    assert f"session {session['session_id']}: its container is gone" in (
        gateway.log_path.read_text()
    )
    ticker.wait(timeout=10)
    held = holdings(gateway)
    assert held.consistent and len(held.rows) == 2


#: A plaintext SSH_MSG_NEWKEYS packet: length 12, padding 10, message 21, the padding.
NEWKEYS = struct.pack(">IBB", 12, 10, 21) + b"\0" * 10


def test_database_survives_sigkill_during_a_write_burst(gateway_factory):
    gateway = gateway_factory("--max-connections-per-session", "64")  # relay, don't refuse
    session = gateway.create(user_id="zoe", ttl_minutes=10).body
    port = session["ssh_port"]
    done = threading.Event()

    def connect_and_leave() -> int:
        made = 0
        while not done.is_set():  # each connection writes a record and two audit events
            try:  # (it is recorded one by one because it ends a key exchange)
                with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
                    sock.sendall(b"SSH-2.0-burst\r\n" + NEWKEYS)
                    sock.recv(64)
            except OSError:  # the gateway is gone
                break
            made += 1
        return made

    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        workers = [pool.submit(connect_and_leave) for _ in range(6)]
        wait_for(lambda: _events(gateway) > 300, timeout=60, what="a burst of writes")
        gateway.stop(signal.SIGKILL)
        done.set()
        made = sum(w.result() for w in workers)
    print(f"\nkilled after {made} connections, {_events(gateway)} events on disk")
    assert gateway.query("PRAGMA integrity_check") == [("ok",)]
    gateway.start()
    records = gateway.request("GET", f"/sessions/{session['session_id']}/connections").body
    assert records["count"] > 0
    assert all(c["ended_at"] is not None for c in records["connections"])  # crash: "error"
    assert gateway.request("GET", f"/sessions/{session['session_id']}").body["state"] == "running"


def _events(gateway: Gateway) -> int:
    return gateway.query("SELECT COUNT(*) FROM audit_events")[0][0]


def test_a_database_from_a_newer_gateway_is_refused_in_one_line(gateway_factory):
    gateway = gateway_factory(start=False)
    gateway.state_dir.mkdir(mode=0o700)
    gateway.query(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(AssertionError, match="exited early"):
        gateway.start()
    assert gateway.proc is not None and gateway.proc.wait() != 0
    output = gateway.log_path.read_text()
    assert "Traceback" not in output
    (line,) = [line for line in output.splitlines() if line.startswith("sandman:")]
    assert line == (
        f"sandman: {gateway.state_dir / 'sessions.db'}: database schema version "
        f"{SCHEMA_VERSION + 1} is newer than this"
        f" gateway's {SCHEMA_VERSION}: run the newer gateway, or restore a backup made for this one"
    )
    assert gateway.query("PRAGMA user_version") == [(SCHEMA_VERSION + 1,)]  # untouched


def test_a_database_from_the_first_release_is_migrated(gateway_factory, ssh):
    gateway = gateway_factory(start=False)
    gateway.state_dir.mkdir(mode=0o700)
    conn = sqlite3.connect(gateway.state_dir / "sessions.db", isolation_level=None)
    conn.executescript(MIGRATIONS[0])
    conn.execute("PRAGMA user_version = 1")
    conn.execute("INSERT INTO users (user_id, uid, created_at) VALUES ('old', 23456, 0)")
    conn.close()
    gateway.start()
    assert gateway.query("PRAGMA user_version") == [(SCHEMA_VERSION,)]
    session = gateway.create(user_id="old").body
    assert ssh.with_key(session, "id -u").stdout == "23456\n"  # the user kept their uid
