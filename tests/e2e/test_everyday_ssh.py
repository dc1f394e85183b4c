"""Everyday SSH habits through a session port, with the real OpenSSH client: agent and Unix
socket forwarding as the gateway's settings say, the VS Code Remote-SSH bootstrap, and the
documented known-hosts setup read by paramiko (Fabric, Ansible) without raising."""

from __future__ import annotations

import contextlib
import http.client
import os
import shlex
import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paramiko

from tests.e2e.conftest import free_tcp_port, wait_for

# A stand-in for VS Code's server bootstrap: run over `ssh -T host bash -s`, it starts a
# server on a random port that outlives the connection and prints where, as VS Code does.
VSCODE_BOOTSTRAP = r"""
set -e
dir="$HOME/.vscode-server-emulated"
mkdir -p "$dir" && cd "$dir" && rm -f port
echo "served through -L" > index.html
nohup python3 -c '
import http.server
server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
print(server.server_address[1], flush=True)
server.serve_forever()' > port 2> server.log < /dev/null &
for _ in $(seq 100); do [ -s port ] && break; sleep 0.1; done
echo "listeningOn==$(cat port)=="
"""


def _login(ssh: Any, session: dict[str, Any], *extra: str) -> list[str]:
    """``ssh`` with the session's key, ``extra`` options, and the user@host target."""
    return [*shlex.split(ssh.key_command(session)), *extra, f"{session['ssh_user']}@127.0.0.1"]


@contextlib.contextmanager
def ssh_agent(tmp_path: Path) -> Iterator[tuple[dict[str, str], str]]:
    """A real ``ssh-agent`` holding a new key: its environment and the key's fingerprint."""
    sock = tmp_path / "agent.sock"
    agent = subprocess.Popen(["ssh-agent", "-D", "-a", str(sock)], stdout=subprocess.DEVNULL)
    try:
        wait_for(sock.exists, timeout=10, what="ssh-agent's socket")
        env = {**os.environ, "SSH_AUTH_SOCK": str(sock)}
        key = tmp_path / "id_agent"
        keygen = ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "laptop", "-f", str(key)]
        subprocess.run(keygen, check=True)
        subprocess.run(["ssh-add", "-q", str(key)], env=env, check=True, capture_output=True)
        listed = subprocess.run(
            ["ssh-keygen", "-lf", f"{key}.pub"], capture_output=True, text=True, check=True
        )
        yield env, listed.stdout.split()[1]
    finally:
        agent.kill()
        agent.wait()


def unix_greeter(path: Path) -> socket.socket:
    """A local Unix socket that greets each connection (a stand-in for gpg-agent's)."""
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(path))
    server.listen()

    def serve() -> None:
        with contextlib.suppress(OSError):
            while True:
                conn, _ = server.accept()
                with conn:
                    conn.sendall(b"hello from the laptop\n")

    threading.Thread(target=serve, daemon=True).start()
    return server


READ_SOCKET = (
    "python3 -c 'import socket; s = socket.socket(socket.AF_UNIX); "
    's.connect("/home/alice/S.forwarded"); print(s.recv(100).decode().strip())\''
)


def run(argv: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60)


def agent_keys(ssh: Any, session: dict[str, Any], env: dict[str, str], *extra: str) -> Any:
    """``ssh-add -l`` in the session, with the agent of ``env`` (forwarded if ``-A``)."""
    return run([*_login(ssh, session, *extra), "ssh-add -l"], env)


def read_forwarded_socket(ssh: Any, session: dict[str, Any], local: Path) -> Any:
    """Forward the local socket ``local`` onto ``~/S.forwarded`` and read it in there."""
    forward = ["-o", "ExitOnForwardFailure=yes", "-R", f"/home/alice/S.forwarded:{local}"]
    return run([*_login(ssh, session, *forward), READ_SOCKET])


def test_agent_forwarding_is_on_and_socket_forwarding_off_by_default(
    gateway_factory: Any, ssh: Any, tmp_path: Path
) -> None:
    gateway = gateway_factory()
    session = gateway.create(user_id="alice").body
    with ssh_agent(tmp_path) as (env, fingerprint):
        listed = agent_keys(ssh, session, env, "-A")
        assert listed.returncode == 0, listed.stderr
        assert fingerprint in listed.stdout and "laptop" in listed.stdout
        without_a = agent_keys(ssh, session, env)  # the client must still ask
        assert without_a.returncode == 2, without_a.stdout

    with unix_greeter(tmp_path / "S.local"):
        refused = read_forwarded_socket(ssh, session, tmp_path / "S.local")
    assert refused.returncode == 255
    assert "remote port forwarding failed" in refused.stderr


def test_the_settings_turn_agent_forwarding_off_and_socket_forwarding_on(
    gateway_factory: Any, ssh: Any, tmp_path: Path
) -> None:
    gateway = gateway_factory("--ssh-agent-forwarding", "off", "--ssh-streamlocal-forwarding", "on")
    session = gateway.create(user_id="alice").body
    with ssh_agent(tmp_path) as (env, _):
        listed = agent_keys(ssh, session, env, "-A")
    assert listed.returncode == 2
    assert "Could not open a connection to your authentication agent" in listed.stderr

    with unix_greeter(tmp_path / "S.local"):
        # twice: the second connection replaces the socket the first one left behind
        for _ in range(2):
            done = read_forwarded_socket(ssh, session, tmp_path / "S.local")
            assert (done.returncode, done.stdout) == (0, "hello from the laptop\n"), done.stderr


def _http_get(port: int) -> tuple[int, bytes] | None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", "/index.html")
        response = conn.getresponse()
        return response.status, response.read()
    except OSError:
        return None
    finally:
        conn.close()


def test_vscode_style_bootstrap_then_a_local_forward(gateway: Any, ssh: Any) -> None:
    session = gateway.create(user_id="alice").body
    boot = subprocess.run(
        [*_login(ssh, session, "-T"), "bash -s"],
        input=VSCODE_BOOTSTRAP, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert boot.returncode == 0, boot.stderr
    remote_port = int(boot.stdout.strip().split("==")[1])
    local_port = free_tcp_port()
    tunnel = subprocess.Popen(
        [*_login(ssh, session, "-N", "-L", f"127.0.0.1:{local_port}:127.0.0.1:{remote_port}")]
    )
    try:
        got: list[tuple[int, bytes] | None] = [None]

        def answered() -> bool:
            assert tunnel.poll() is None, "the ssh -L process exited"
            got[0] = _http_get(local_port)
            return got[0] is not None

        wait_for(answered, timeout=30, what="the forwarded server to answer")
        assert got[0] == (200, b"served through -L\n")
    finally:
        tunnel.terminate()
        tunnel.wait(timeout=10)


# The README's known-hosts setup (First login), with ~ as this test's home.
DOCUMENTED_SSH_CONFIG = """\
Host 127.0.0.1
    UserKnownHostsFile ~/.ssh/known_hosts ~/.ssh/sandman/known_hosts
"""


def test_documented_known_hosts_setup_logs_in_strictly_and_paramiko_still_loads(
    gateway: Any, ssh: Any, tmp_path: Path, monkeypatch: Any
) -> None:
    home = tmp_path / "home"
    (home / ".ssh" / "sandman").mkdir(parents=True)
    own = "github.com ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl"  # noqa: E501
    (home / ".ssh" / "known_hosts").write_text(own + "\n")  # what the user had before
    ca_line = gateway.request("GET", "/ssh/known_hosts").body
    (home / ".ssh" / "sandman" / "known_hosts").write_text(ca_line)
    config = home / ".ssh" / "config"
    config.write_text(DOCUMENTED_SSH_CONFIG.replace("~", str(home)))

    session = gateway.create(user_id="alice").body
    key = ssh.save_key(session)
    done = subprocess.run(
        ["ssh", "-F", str(config), "-p", str(session["ssh_port"]), "-i", str(key),
         "-o", "StrictHostKeyChecking=yes", "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes",
         "-o", "GlobalKnownHostsFile=/dev/null", "alice@127.0.0.1", "id -un"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert (done.returncode, done.stdout) == (0, "alice\n"), done.stderr

    monkeypatch.setenv("HOME", str(home))
    client = paramiko.SSHClient()
    client.load_system_host_keys()  # ~/.ssh/known_hosts, which the setup left alone
    client.load_host_keys(str(home / ".ssh" / "known_hosts"))
    assert client.get_host_keys().lookup("github.com") is not None
    parsed = paramiko.SSHConfig.from_path(str(config)).lookup("127.0.0.1")
    assert parsed["userknownhostsfile"].split()[-1] == str(home / ".ssh/sandman/known_hosts")


def test_tmux_attach_lands_terminal_logins_in_tmux_and_leaves_commands_alone(
    gateway_factory: Any, ssh: Any, tmp_path: Path
) -> None:
    gateway = gateway_factory("--tmux-attach")
    session = gateway.create(user_id="alice").body

    def in_session(command: str) -> str:
        done = ssh.with_key(session, command)
        assert done.returncode == 0, done.stderr
        return done.stdout

    terminal = subprocess.Popen(
        [*_login(ssh, session, "-tt")],
        stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        env={**os.environ, "TERM": "xterm"},
    )  # fmt: skip
    try:
        wait_for(
            lambda: "main: 1 windows" in ssh.with_key(session, "tmux ls").stdout,
            timeout=30, what="the terminal login's tmux session",
        )  # fmt: skip
    finally:
        terminal.kill()
        terminal.wait()
    assert in_session("echo plain; echo ${TMUX:-none}") == "plain\nnone\n"  # ssh host cmd: no tmux
    assert "main: 1 windows" in in_session("tmux ls")  # it outlives the connection
    (tmp_path / "up.txt").write_text("through sftp\n")
    batch = tmp_path / "batch"
    batch.write_text(f"put {tmp_path / 'up.txt'} up.txt\nget up.txt {tmp_path / 'down.txt'}\n")
    options = ["-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null"]
    sftp = subprocess.run(
        ["sftp", "-P", str(session["ssh_port"]), "-i", str(ssh.save_key(session)), *options,
         "-b", str(batch), f"{session['ssh_user']}@127.0.0.1"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert sftp.returncode == 0, sftp.stderr
    assert (tmp_path / "down.txt").read_text() == "through sftp\n"
