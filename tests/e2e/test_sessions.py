"""The core user journey against the real gateway, Docker and ssh (issue: gateway core)."""

from __future__ import annotations

import concurrent.futures
import signal

from gateway.config import Config
from gateway.runtime.base import SSHD_CAPABILITIES
from tests.e2e.conftest import docker, port_refuses, wait_for
from tests.net import port_bindable
from tests.routes import PROTECTED_ROUTES

CAP_BITS = {
    "CHOWN": 0,
    "DAC_OVERRIDE": 1,
    "DAC_READ_SEARCH": 2,
    "FOWNER": 3,
    "FSETID": 4,
    "KILL": 5,
    "SETGID": 6,
    "SETUID": 7,
    "SETPCAP": 8,
    "NET_BIND_SERVICE": 10,
    "NET_RAW": 13,
    "SYS_CHROOT": 18,
    "SYS_PTRACE": 19,
    "SYS_ADMIN": 21,
    "MKNOD": 27,
    "AUDIT_WRITE": 29,
    "SETFCAP": 31,
}


def test_ssh_right_after_create_writes_workspace_as_stable_uid(gateway, ssh):
    created = gateway.create(user_id="alice", ttl_minutes=10)
    assert created.status == 201, created.body
    session = created.body

    result = ssh.with_key(session, "id -u; touch ~/made-here; echo ok")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["10000", "ok"]
    made = gateway.workspaces / "alice" / "made-here"
    assert made.stat().st_uid == 10000 and made.stat().st_gid == 10000

    by_password = ssh.with_password(session, "whoami")
    assert by_password.returncode == 0, by_password.stderr
    assert by_password.stdout.strip() == "alice"

    # second session after delete: same uid, same files
    assert gateway.request("DELETE", f"/sessions/{session['session_id']}").status == 200
    again = gateway.create(user_id="alice")
    assert again.status == 201, again.body
    result = ssh.with_key(again.body, "id -u; ls ~/made-here")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["10000", "/home/alice/made-here"]


def test_without_password_auth_a_password_is_refused_and_the_key_works(gateway_factory, ssh):
    gateway = gateway_factory("--no-ssh-password-auth")
    session = gateway.create(user_id="olga").body
    assert session["ssh_password"] is None  # none made up, none shown
    by_key = ssh.with_key(session, "whoami; test -e /etc/sandman/password-hash || echo no-hash")
    assert by_key.returncode == 0, by_key.stderr
    assert by_key.stdout.split() == ["olga", "no-hash"]
    guessed = ssh.with_password({**session, "ssh_password": "a-guess"}, "whoami")
    assert guessed.returncode != 0
    assert "Permission denied (publickey)." in guessed.stderr  # sshd offers no password


def test_concurrent_creates_for_one_user_give_one_session(gateway):
    with concurrent.futures.ThreadPoolExecutor(5) as pool:
        results = list(pool.map(lambda _: gateway.create(user_id="bob"), range(5)))
    statuses = sorted(r.status for r in results)
    assert statuses == [201, 409, 409, 409, 409], [r.body for r in results]
    assert {r.body["code"] for r in results if r.status == 409} == {"session_exists"}
    assert len(gateway.containers("label=sandman.user_id=bob")) == 1


def test_delete_closes_port_removes_container_and_row(gateway, ssh):
    session = gateway.create(user_id="carol").body
    assert ssh.with_key(session, "true").returncode == 0
    response = gateway.request("DELETE", f"/sessions/{session['session_id']}")
    assert response.status == 200 and "message" in response.body
    assert port_refuses(session["ssh_port"])
    assert docker("ps", "-aq", "--filter", f"id={session['container_id']}") == ""
    assert gateway.request("GET", f"/sessions/{session['session_id']}").status == 404


def test_expired_session_is_cleaned_and_workspace_kept(gateway_factory, ssh):
    gateway = gateway_factory("--reap-interval", "0.5")
    session = gateway.create(user_id="dave", ttl_seconds=3).body
    assert ssh.with_key(session, "echo kept > ~/notes.txt").returncode == 0
    wait_for(
        lambda: gateway.request("GET", f"/sessions/{session['session_id']}").status == 404,
        timeout=20,
        what="the sweep to end the session",
    )
    assert docker("ps", "-aq", "--filter", f"id={session['container_id']}") == ""
    assert port_bindable(session["ssh_port"])
    assert (gateway.workspaces / "dave" / "notes.txt").read_text() == "kept\n"


def test_sigkill_restart_keeps_sessions_and_removes_orphans(gateway, ssh):
    session = gateway.create(user_id="erin").body
    assert ssh.with_key(session, "true").returncode == 0
    gateway.stop(signal.SIGKILL)
    assert port_refuses(session["ssh_port"])
    orphan = docker(
        "run",
        "-d",
        "--network",
        gateway.network,
        "--label",
        "sandman.session_id=gone",
        "--label",
        f"sandman.instance={gateway.instance_id()}",
        "--entrypoint",
        "sleep",
        "sandman-base:bookworm",
        "600",
    )
    stranger = docker(
        "run",
        "-d",
        "--network",
        gateway.network,
        "--label",
        "sandman.session_id=other",
        "--label",
        "sandman.instance=someone-else",
        "--entrypoint",
        "sleep",
        "sandman-base:bookworm",
        "600",
    )

    gateway.start()
    listed = gateway.request("GET", "/sessions").body
    assert [s["id"] for s in listed] == [session["session_id"]]
    result = ssh.with_key(session, "whoami")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "erin"
    assert docker("ps", "-aq", "--filter", f"id={orphan}") == ""
    assert docker("ps", "-aq", "--filter", f"id={stranger}") != ""  # not ours: untouched


def test_restart_cleans_session_whose_container_is_gone(gateway):
    session = gateway.create(user_id="frank").body
    gateway.stop(signal.SIGKILL)
    docker("rm", "-f", session["container_id"])
    gateway.start()
    assert gateway.request("GET", "/sessions").body == []
    assert gateway.create(user_id="frank").body["ssh_port"] == session["ssh_port"]


def test_auth_and_validation_create_nothing(gateway):
    for method, path in PROTECTED_ROUTES:
        response = gateway.request(method, path, token=None)
        assert response.status == 401 and response.body["code"] == "unauthorized", path
    assert gateway.request("GET", "/healthz", token=None).status == 200
    cases = [
        (b"{oops", "invalid_request"),
        (b'{"user_id": "gina", "shell": "zsh"}', "invalid_request"),
        (b'{"user_id": "../x"}', "invalid_user_id"),
        (b'{"user_id": "root"}', "invalid_user_id"),
        (b'{"user_id": "A"}', "invalid_user_id"),
        (b'{"user_id": "' + b"a" * 33 + b'"}', "invalid_user_id"),
        (
            b'{"user_id": "gina", "mig_profile": "1g.10gb", "mig_instance_uuid": "MIG-1"}',
            "invalid_request",
        ),
        (b'{"user_id": "gina", "ttl_minutes": 0}', "invalid_ttl"),
        (b'{"user_id": "gina", "ttl_minutes": 100000}', "invalid_ttl"),
    ]
    for raw, code in cases:
        response = gateway.request("POST", "/sessions", raw=raw)
        assert (response.status, response.body["code"]) == (400, code), raw
    assert gateway.request("GET", "/sessions").body == []
    assert gateway.containers() == []
    assert not (gateway.workspaces / "..").joinpath("x").exists()


def test_capabilities_are_minimal_and_login_shell_has_none(gateway, ssh):
    session = gateway.create(user_id="hank").body
    result = ssh.with_key(session, "grep CapEff /proc/1/status; grep CapEff /proc/self/status")
    assert result.returncode == 0, result.stderr
    pid1, shell = (int(line.split()[1], 16) for line in result.stdout.splitlines())
    assert pid1 == sum(1 << CAP_BITS[cap] for cap in SSHD_CAPABILITIES)
    assert shell == 0
    inspect = docker(
        "inspect",
        "-f",
        "{{json .HostConfig.SecurityOpt}} {{.HostConfig.PidsLimit}}",
        session["container_id"],
    )
    security, pids_limit = inspect.split()
    assert "no-new-privileges" in security
    assert int(pids_limit) == Config().pids_limit  # the default --pids-limit reaches Docker
    mounts = docker(
        "inspect", "-f", "{{range .Mounts}}{{.Source}} {{end}}", session["container_id"]
    )
    assert mounts.split() == [str(gateway.workspaces / "hank")]


def test_no_egress_network_is_internal_and_still_reachable(gateway_factory, ssh):
    gateway = gateway_factory("--no-egress")
    assert docker("network", "inspect", "-f", "{{.Internal}}", gateway.network) == "true"
    icc = docker(
        "network", "inspect", "-f",
        '{{index .Options "com.docker.network.bridge.enable_icc"}}', gateway.network,
    )  # fmt: skip
    assert icc == "false"
    session = gateway.create(user_id="quinn").body
    result = ssh.with_key(session, "whoami")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "quinn"
