"""End-to-end harness: the real gateway process, real Docker, real OpenSSH client.

Each test gets its own gateway (state folder, API port, SSH port range, Docker network
and instance id), so tests never see each other's sessions. Everything a test starts is
removed in teardown, even when it fails. A missing Docker engine, image or ssh client is
a failure, never a skip.
"""

from __future__ import annotations

import contextlib
import http.client
import itertools
import json
import os
import secrets
import shlex
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from tests.net import free_tcp_port

IMAGE = os.environ.get("SANDMAN_TEST_IMAGE", "gpu-workspace")
DOCKER_SOCKET = "/var/run/docker.sock"
TOKEN = "e2e-" + secrets.token_hex(8)
START_DEADLINE = 60.0
_port_blocks = itertools.count()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "/e2e/" in str(item.fspath):
            item.add_marker(pytest.mark.e2e)


@pytest.fixture(scope="session", autouse=True)
def prerequisites() -> None:
    tools = ("docker", "ssh", "sshpass", "socat", "rsync")
    missing = [tool for tool in tools if shutil.which(tool) is None]
    if missing:
        pytest.fail(f"e2e tests need {', '.join(missing)} (run: make setup)")
    if subprocess.run(["docker", "info"], capture_output=True).returncode != 0:
        pytest.fail("e2e tests need a running Docker engine (run: make setup)")
    if subprocess.run(["docker", "image", "inspect", IMAGE], capture_output=True).returncode:
        pytest.fail(f"e2e tests need the image {IMAGE} (run: make images)")
    remove_stale_test_networks()


def remove_stale_test_networks(older_than: timedelta = timedelta(hours=2)) -> None:
    """Remove the empty ``sandman-test-*`` networks a killed run left behind: each holds one
    of the engine's ~30 default address pools. A run takes minutes, so one made hours ago
    belongs to no run in progress (a second run alongside keeps its own)."""
    names = docker("network", "ls", "--filter", "name=sandman-test-", "--format", "{{.Name}}")
    now = datetime.now(UTC)
    for name in names.split():
        shown = docker("network", "inspect", name, "--format",
                       "{{.Created.Unix}} {{len .Containers}}", check=False).split()  # fmt: skip
        empty = len(shown) == 2 and shown[1] == "0"
        if empty and now - datetime.fromtimestamp(int(shown[0]), UTC) > older_than:
            docker("network", "rm", name, check=False)


def port_block() -> tuple[int, int]:
    """A range of 20 session ports that no live gateway of this test process uses (30 blocks
    per process, reused in turn; test processes side by side get other blocks), all below
    Linux's ephemeral range (32768-), so a port picked by :func:`free_tcp_port` for an API
    never lands in one."""
    slot = (os.getpid() % 20) * 30 + next(_port_blocks) % 30
    base = 20000 + slot * 20
    return base, base + 19


def port_refuses(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except ConnectionRefusedError:
        return True
    return False


def parse_time(text: str) -> datetime:
    """An RFC 3339 time as the API writes it (``Z``)."""
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def docker(*args: str, check: bool = True) -> str:
    done = subprocess.run(["docker", *args], capture_output=True, text=True, check=False)
    if check and done.returncode != 0:
        raise AssertionError(f"docker {' '.join(args)} failed: {done.stderr}")
    return done.stdout.strip()


def wait_for(predicate: Any, *, timeout: float, what: str) -> None:
    """Poll an outside condition (another process's state) until true or fail."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.1)


@dataclass
class Response:
    status: int
    body: Any


@dataclass
class Gateway:
    """One real ``sandman serve`` process and what it owns."""

    root: Path
    network: str
    port_start: int
    port_end: int
    extra_args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    api_port: int = field(default_factory=free_tcp_port)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def state_dir(self) -> Path:
        return self.root / "state"

    @property
    def workspaces(self) -> Path:
        return self.root / "workspaces"

    @property
    def log_path(self) -> Path:
        return self.root / "gateway.log"

    def start(self) -> None:
        args = [
            sys.executable,
            "-m",
            "gateway",
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.api_port),
            "--ssh-bind",
            "127.0.0.1",
            "--public-host",
            "127.0.0.1",
            "--state-dir",
            str(self.state_dir),
            "--workspace-root",
            str(self.workspaces),
            "--ssh-port-start",
            str(self.port_start),
            "--ssh-port-end",
            str(self.port_end),
            "--docker-network",
            self.network,
            "--image",
            IMAGE,
            "--gpus",
            "none",
            "--log-level",
            "DEBUG",
            *self.extra_args,
        ]
        env = {**os.environ, "SANDMAN_API_TOKEN": TOKEN, **self.env}
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env)
        wait_for(self._healthy, timeout=START_DEADLINE, what="the gateway to answer /healthz")

    def _healthy(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"gateway exited early:\n{self.log_path.read_text()}")
        try:
            return self.request("GET", "/healthz").status == 200
        except OSError:
            return False

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=30)
        self.proc = None

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        token: str | None = TOKEN,
        raw: bytes | None = None,
    ) -> Response:
        conn = http.client.HTTPConnection("127.0.0.1", self.api_port, timeout=120)
        headers = {"Content-Type": "application/json"}
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        try:
            conn.request(method, path, body=data, headers=headers)
            resp = conn.getresponse()
            payload = resp.read()
        finally:
            conn.close()
        is_json = resp.getheader("Content-Type", "").startswith("application/json")
        return Response(resp.status, json.loads(payload) if is_json else payload.decode())

    def create(self, **body: Any) -> Response:
        return self.request("POST", "/sessions", body)

    def query(self, sql: str) -> list[tuple[Any, ...]]:
        """The rows of one statement on the gateway's database (opened for it alone)."""
        with contextlib.closing(sqlite3.connect(self.state_dir / "sessions.db")) as conn:
            return conn.execute(sql).fetchall()

    def instance_id(self) -> str:
        return self.query("SELECT value FROM meta WHERE key = 'instance_id'")[0][0]

    def containers(self, *filters: str) -> list[str]:
        args = ["ps", "-aq", "--filter", f"network={self.network}"]
        for f in filters:
            args += ["--filter", f]
        return docker(*args).split()

    def cleanup(self) -> None:
        self.stop(signal.SIGKILL)
        ids = self.containers()
        if ids:
            docker("rm", "-f", *ids, check=False)
        docker("network", "rm", self.network, check=False)


@pytest.fixture
def gateway_factory(tmp_path: Path) -> Iterator[Any]:
    made: list[Gateway] = []

    def make(*extra_args: str, start: bool = True) -> Gateway:
        first, last = port_block()
        gw = Gateway(
            root=tmp_path / f"gw{len(made)}",
            network=f"sandman-test-{secrets.token_hex(4)}",
            port_start=first,
            port_end=last,
            extra_args=list(extra_args),
        )
        gw.root.mkdir()
        made.append(gw)
        if start:
            gw.start()
        return gw

    yield make
    for gw in made:
        gw.cleanup()


@pytest.fixture
def gateway(gateway_factory: Any) -> Gateway:
    return gateway_factory()


@dataclass
class SshClient:
    """The real OpenSSH client, logging in through a session port."""

    key_dir: Path

    def _base(self, port: int) -> list[str]:
        return [
            "ssh",
            "-p",
            str(port),
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
            "-o",
            "ConnectTimeout=15",
            "-o",
            "LogLevel=ERROR",
        ]

    def _key_args(self, session: dict[str, Any]) -> list[str]:
        return [
            *self._base(session["ssh_port"]),
            *("-i", str(self.save_key(session)), "-o", "BatchMode=yes"),
            *("-o", "IdentitiesOnly=yes"),
        ]

    def key_command(self, session: dict[str, Any]) -> str:
        """The ``ssh`` command line with the session's key, for ``rsync -e``."""
        return shlex.join(self._key_args(session))

    def terminal_login(self, session: dict[str, Any], typed: str) -> str:
        """Log in with a terminal and no command, as a person does, type ``typed``; return
        everything the terminal showed (login message included)."""
        args = [*self._key_args(session), "-tt", f"{session['ssh_user']}@127.0.0.1"]
        done = subprocess.run(args, input=typed, capture_output=True, text=True, timeout=60)
        return done.stdout

    def with_key(self, session: dict[str, Any], command: str) -> subprocess.CompletedProcess[str]:
        args = [*self._key_args(session), f"{session['ssh_user']}@127.0.0.1", command]
        return subprocess.run(args, capture_output=True, text=True, timeout=60)

    def start_with_key(
        self, session: dict[str, Any], command: str, *, tty: bool = False
    ) -> subprocess.Popen[str]:
        """Start ``ssh`` in the background (``tty``: force a pty, as a terminal would)."""
        args = [
            *self._key_args(session),
            *(["-tt"] if tty else []),
            f"{session['ssh_user']}@127.0.0.1",
            command,
        ]
        return subprocess.Popen(
            args,
            stdin=subprocess.PIPE if tty else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )

    def login(
        self,
        user: str,
        port: int,
        command: str,
        *,
        key_file: Path,
        known_hosts: Path,
        strict: str = "yes",
        host: str = "127.0.0.1",
    ) -> subprocess.CompletedProcess[str]:
        """ssh as a user would, checking the host key against ``known_hosts`` (``strict`` is
        StrictHostKeyChecking: yes, accept-new, ...)."""
        args = [
            "ssh",
            *("-p", str(port), "-i", str(key_file)),
            *("-o", f"StrictHostKeyChecking={strict}"),
            *("-o", f"UserKnownHostsFile={known_hosts}"),
            *("-o", "GlobalKnownHostsFile=/dev/null", "-o", "BatchMode=yes"),
            *("-o", "IdentitiesOnly=yes", "-o", "ConnectTimeout=15"),
            f"{user}@{host}",
            command,
        ]
        return subprocess.run(args, capture_output=True, text=True, timeout=60)

    def save_key(self, session: dict[str, Any]) -> Path:
        """The session's generated private key, saved 0600 as a user would."""
        key = self.key_dir / f"{session['session_id']}.key"
        key.write_text(session["ssh_private_key"])
        key.chmod(0o600)
        return key

    def with_password(
        self, session: dict[str, Any], command: str
    ) -> subprocess.CompletedProcess[str]:
        args = [
            "sshpass",
            "-p",
            session["ssh_password"],
            *self._base(session["ssh_port"]),
            "-o",
            "PubkeyAuthentication=no",
            "-o",
            "PreferredAuthentications=password",
            f"{session['ssh_user']}@127.0.0.1",
            command,
        ]
        return subprocess.run(args, capture_output=True, text=True, timeout=60)


def logged_in(ssh: SshClient, session: dict[str, Any]) -> subprocess.Popen[str]:
    """An ``ssh`` left running in the session, returned once it is logged in."""
    proc = ssh.start_with_key(session, "echo ready; exec sleep 600")
    assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
    return proc


@pytest.fixture
def ssh(tmp_path: Path) -> SshClient:
    key_dir = tmp_path / "keys"
    key_dir.mkdir()
    return SshClient(key_dir)


@pytest.fixture
def topology(tmp_path: Path) -> Any:
    """Write a simulated GPU host; returns the ``--gpus`` value naming it."""

    def write(data: dict[str, Any]) -> str:
        path = tmp_path / f"topology-{secrets.token_hex(3)}.json"
        path.write_text(json.dumps(data))
        return f"sim:{path}"

    return write


class SocketProxy:
    """A Docker socket that can be taken away: socat relaying to the real one. Stopping it
    kills its whole process group, so connections already open die too."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                "socat",
                f"UNIX-LISTEN:{self.path},fork,unlink-early",
                f"UNIX-CONNECT:{DOCKER_SOCKET}",
            ],
            start_new_session=True,
        )
        wait_for(self.path.exists, timeout=10, what="the socket proxy")

    def stop(self) -> None:
        if self.proc is not None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            self.proc = None
        self.path.unlink(missing_ok=True)


@pytest.fixture
def docker_proxy(tmp_path: Path) -> Iterator[SocketProxy]:
    proxy = SocketProxy(tmp_path / "docker.sock")
    proxy.start()
    yield proxy
    proxy.stop()


def listening_ports(pid: int | None, first: int, last: int) -> set[int]:
    """The TCP ports in ``first..last`` that process ``pid`` listens on (IPv4)."""
    if pid is None:
        return set()
    sockets = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):  # closed meanwhile
            target = str(fd.readlink())
            if target.startswith("socket:["):
                sockets.add(target[len("socket:[") : -1])
    ports = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        port = int(fields[1].split(":")[1], 16)
        if fields[3] == "0A" and fields[9] in sockets and first <= port <= last:  # 0A: LISTEN
            ports.add(port)
    return ports


@dataclass(frozen=True)
class Holdings:
    """What a gateway holds, each seen from its own source of truth."""

    rows: dict[str, tuple[int, str | None]]  # session id -> (port, GPU uuid), from the database
    containers: set[str]  # session ids of its labelled containers, any state, from Docker
    listeners: set[int]  # ports of its range its process listens on, from the kernel

    @property
    def consistent(self) -> bool:
        """Every row has its container and listener, and nothing else exists."""
        ports = {port for port, _gpu in self.rows.values()}
        return set(self.rows) == self.containers and ports == self.listeners

    @property
    def slices(self) -> set[str]:
        return {gpu for _port, gpu in self.rows.values() if gpu}


def holdings(gateway: Gateway) -> Holdings:
    found = gateway.query("SELECT id, ssh_port, gpu_uuid FROM sessions")
    rows = {session_id: (port, gpu) for session_id, port, gpu in found}
    labels = docker(
        "ps", "-a", "--filter", f"label=sandman.instance={gateway.instance_id()}",
        "--format", '{{.Label "sandman.session_id"}}',
    )  # fmt: skip
    return Holdings(
        rows=rows,
        containers=set(labels.split()),
        listeners=listening_ports(
            gateway.proc.pid if gateway.proc else None, gateway.port_start, gateway.port_end
        ),
    )


@dataclass(frozen=True)
class Usage:
    rss_kib: int
    fds: int

    def __str__(self) -> str:
        return f"RSS {self.rss_kib / 1024:.1f} MiB, {self.fds} open fds"


def usage(pid: int) -> Usage:
    """A process's resident memory and open file descriptors, from /proc."""
    status = Path(f"/proc/{pid}/status").read_text()
    (rss,) = [line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:")]
    return Usage(int(rss), sum(1 for _ in Path(f"/proc/{pid}/fd").iterdir()))
