"""Isolation, checked from inside real session containers over real ssh: no capabilities
and no way to gain any, no path to another user's container, files or the API, no host
path but the workspace, no Docker socket, CPU and memory limits in the cgroup, and no
secret at rest."""

from __future__ import annotations

import contextlib
import json
import sqlite3
import stat

from tests.e2e.conftest import docker

CAPS = ("CapInh", "CapPrm", "CapEff", "CapAmb")
SETUID_BAIT = ("passwd", "chfn", "chsh", "su")  # as in SETUID_PROBE
# Run each setuid-root binary that waits for input, and read its effective uid while it
# waits: no-new-privileges must leave it the user's.
SETUID_PROBE = r"""
grep -E '^(CapInh|CapPrm|CapEff|CapAmb|NoNewPrivs):' /proc/self/status
echo "setuid: $(find / -xdev -perm -4000 -user root -type f 2>/dev/null | tr '\n' ' ')"
fifo=$(mktemp -u); mkfifo "$fifo"; exec 3<>"$fifo"
for bin in passwd chfn chsh su; do
  "/usr/bin/$bin" <&3 >/dev/null 2>&1 & pid=$!
  for i in $(seq 50); do
    [ "$(cat /proc/$pid/comm 2>/dev/null)" = "$bin" ] && break; sleep 0.1
  done
  echo "$bin $(awk '/^Uid:/ {print $3}' /proc/$pid/status 2>/dev/null)"
  kill $pid 2>/dev/null
done
"""
PSEUDO_FS = {
    "overlay", "proc", "sysfs", "tmpfs", "devpts", "mqueue", "cgroup", "cgroup2", "devtmpfs",
    "securityfs", "debugfs", "tracefs", "fusectl", "bpf", "nsfs", "hugetlbfs", "pstore",
    "configfs", "binfmt_misc", "autofs",
}  # fmt: skip
DOCKER_FILES = {"/etc/resolv.conf", "/etc/hostname", "/etc/hosts"}  # Docker's, per container
CGROUP = (
    "cat /sys/fs/cgroup/cpu.max 2>/dev/null || echo "
    '"$(cat /sys/fs/cgroup/cpu/cpu.cfs_quota_us) $(cat /sys/fs/cgroup/cpu/cpu.cfs_period_us)"; '
    "cat /sys/fs/cgroup/memory.max 2>/dev/null || cat /sys/fs/cgroup/memory/memory.limit_in_bytes"
)
MIB = 1024**2


def run(ssh, session, command: str) -> str:
    result = ssh.with_key(session, command)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_login_shell_has_no_capabilities_and_setuid_does_not_elevate(gateway, ssh):
    session = gateway.create(user_id="ivy").body
    lines = run(ssh, session, SETUID_PROBE).splitlines()
    status = dict(line.split(":", 1) for line in lines if line.startswith((*CAPS, "NoNewPrivs")))
    assert {cap: int(status[cap], 16) for cap in CAPS} == dict.fromkeys(CAPS, 0)
    assert status["NoNewPrivs"].strip() == "1"
    setuid = next(line for line in lines if line.startswith("setuid:")).split()[1:]
    assert "/usr/bin/passwd" in setuid and "/usr/bin/su" in setuid  # there is bait
    probed = [line.split(" ") for line in lines if line.split(" ")[0] in SETUID_BAIT]
    observed = {name: uid for name, uid in probed if uid}  # those that waited to be looked at
    assert observed, f"no setuid binary stayed to be looked at: {lines}"
    assert set(observed.values()) == {"10000"}, observed  # never 0


def _probe_tcp(ssh, session, host: str, port: int) -> bool:
    """Whether the container of ``session`` can open a TCP connection to host:port."""
    out = run(
        ssh,
        session,
        f"timeout 3 bash -c 'exec 3<>/dev/tcp/{host}/{port}' 2>/dev/null && echo open || echo shut",
    )
    return out.strip() == "open"


def _bridge_gateway(network: str) -> str:
    return docker("network", "inspect", "-f", "{{(index .IPAM.Config 0).Gateway}}", network)


def test_users_reach_neither_each_other_nor_the_api(gateway, ssh):
    alice = gateway.create(user_id="alice").body
    assert gateway.create(user_id="bob").status == 201
    views = {s["user_id"]: s for s in gateway.request("GET", "/sessions").body}
    alice_ip, bob_ip = views["alice"]["container_ip"], views["bob"]["container_ip"]
    (gateway.workspaces / "bob" / "secret.txt").write_text("bob's")

    assert _probe_tcp(ssh, alice, alice_ip, 22)  # the probe works: its own sshd answers
    assert not _probe_tcp(ssh, alice, bob_ip, 22)  # inter-container traffic is off
    assert run(ssh, alice, "ls -A /home").split() == ["alice"]
    assert ssh.with_key(alice, "cat /home/bob/secret.txt").returncode != 0
    # the API binds loopback (e2e, and the default): the host's bridge address shuts
    assert not _probe_tcp(ssh, alice, _bridge_gateway(gateway.network), gateway.api_port)


def test_an_api_on_a_wildcard_address_is_reachable_from_containers(gateway_factory, ssh):
    """What ``--host 0.0.0.0`` means: the host's bridge address answers, so only a firewall
    keeps containers away (SECURITY.md)."""
    gateway = gateway_factory("--host", "0.0.0.0")
    session = gateway.create(user_id="carl").body
    assert _probe_tcp(ssh, session, _bridge_gateway(gateway.network), gateway.api_port)


def test_only_the_workspace_is_mounted_and_no_docker_socket(gateway, ssh):
    session = gateway.create(user_id="dora").body
    out = run(
        ssh,
        session,
        "cat /proc/self/mountinfo; echo ---; ls -l /var/run/docker.sock /run/docker.sock "
        "2>&1; find / -xdev -name docker.sock 2>/dev/null; true",
    )
    mountinfo, sockets = out.split("---\n")
    host_backed = {}
    for line in mountinfo.splitlines():
        fields, _, tail = line.partition(" - ")
        root, mount_point = fields.split()[3:5]
        if tail.split()[0] not in PSEUDO_FS:
            host_backed[mount_point] = root
    assert set(host_backed) - DOCKER_FILES == {"/home/dora"}, host_backed
    assert host_backed["/home/dora"].endswith("/workspaces/dora")
    assert "docker.sock" not in mountinfo
    assert sockets.count("No such file or directory") == 2 and "docker.sock\n" not in sockets


def test_cpu_and_memory_limits_reach_the_cgroup(gateway_factory, ssh):
    gateway = gateway_factory(
        *("--cpu-limit", "0.5", "--max-cpu-limit", "1"),
        *("--memory-limit", "256m", "--max-memory-limit", "512m"),
    )
    plain = gateway.create(user_id="ed").body
    assert run(ssh, plain, CGROUP).split() == ["50000", "100000", str(256 * MIB)]
    big = gateway.create(user_id="flo", cpu_limit=1, memory_limit="512m")
    assert big.status == 201, big.body
    assert run(ssh, big.body, CGROUP).split() == ["100000", "100000", str(512 * MIB)]
    view = gateway.request("GET", f"/sessions/{big.body['session_id']}").body
    assert (view["cpu_limit"], view["memory_limit"]) == (1, 512 * MIB)

    too_much = gateway.create(user_id="gil", memory_limit="1g")
    assert (too_much.status, too_much.body["code"]) == (400, "invalid_limit")
    assert gateway.containers("label=sandman.user_id=gil") == []


def test_no_private_key_or_password_at_rest(gateway_factory, ssh, tmp_path):
    gateway = gateway_factory(start=False)
    gateway.env["SANDMAN_API_TOKEN"] = ""  # generated into the state folder
    gateway.start()
    token = (gateway.state_dir / "api-token").read_text().strip()
    created = gateway.request("POST", "/sessions", {"user_id": "hal"}, token=token).body
    key_file = ssh.save_key(created)
    assert run(ssh, created, "whoami").strip() == "hal"
    assert ssh.with_password(created, "true").returncode == 0
    key_body = "".join(key_file.read_text().strip().splitlines()[1:-1])
    secrets = {"password": created["ssh_password"], "private key": key_body[20:80]}
    container = docker("inspect", created["container_id"])  # environment, labels, command
    gateway.request("DELETE", f"/sessions/{created['session_id']}", token=token)
    key_file.unlink()  # the test's own copy, as a user would keep it

    state = gateway.state_dir
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    for path in state.iterdir():
        if path.suffix != ".pub":  # the CA's public half
            assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    with contextlib.closing(sqlite3.connect(state / "sessions.db")) as conn:
        dump = "\n".join(conn.iterdump())
    audit = json.dumps(gateway.request("GET", "/audit", token=token).body)
    # state folder, database and WAL, audit log, the gateway's DEBUG log, workspaces
    files = [p for p in tmp_path.rglob("*") if p.is_file() and not p.is_symlink()]
    assert gateway.log_path in files and state / "sessions.db" in files
    for what, secret in secrets.items():
        for path in files:
            assert secret.encode() not in path.read_bytes(), f"{what} found in {path}"
        for where, text in (("database", dump), ("audit", audit), ("container", container)):
            assert secret not in text, f"{what} found in the {where}"
