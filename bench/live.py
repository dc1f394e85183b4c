"""Through a real gateway and real Docker: ``ssh`` bulk through a session port vs straight to
the container, POST-to-ready vs a bare container start, and many live sessions at once.

The gateway is a ``sandman serve`` process of its own (state folder, API port, port range,
Docker network, no GPUs); everything it or the benchmark starts is removed at the end,
even when a part fails.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import http.client
import io
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiodocker

from bench.tools import GiB, cpu_seconds, free_port, median, open_fds, percentile, rss_bytes
from gateway.session_files import AUTHORIZED_KEYS_DIR, HOST_KEY, PASSWORD_HASH, SESSION_INFO

TOKEN = "bench-" + secrets.token_hex(8)
PORTS = (45000, 45249)
START_DEADLINE = 60.0
SESSION_FILES = (HOST_KEY, HOST_KEY + ".pub", HOST_KEY + "-cert.pub", AUTHORIZED_KEYS_DIR,
                 PASSWORD_HASH, SESSION_INFO)  # fmt: skip
HOST_CONFIG_KEYS = ("Binds", "CapDrop", "CapAdd", "SecurityOpt", "PidsLimit", "NetworkMode",
                    "RestartPolicy", "Init")  # fmt: skip
READY_POLL_SECONDS = 0.1  # as the gateway's readiness check polls


@dataclass
class Gateway:
    """One ``sandman serve`` process and what it owns."""

    root: Path
    image: str
    network: str = field(default_factory=lambda: f"sandman-bench-{secrets.token_hex(4)}")
    extra: tuple[str, ...] = ()  # further ``serve`` options
    api_port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        args = [
            sys.executable, "-m", "gateway", "serve",
            "--host", "127.0.0.1", "--port", str(self.api_port),
            "--ssh-bind", "127.0.0.1", "--public-host", "127.0.0.1",
            "--state-dir", str(self.root / "state"),
            "--workspace-root", str(self.root / "workspaces"),
            "--ssh-port-start", str(PORTS[0]), "--ssh-port-end", str(PORTS[1]),
            "--docker-network", self.network, "--image", self.image, "--gpus", "none",
            *self.extra,
        ]  # fmt: skip
        env = {**os.environ, "SANDMAN_API_TOKEN": TOKEN}
        with (self.root / "gateway.log").open("ab") as log:
            self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + START_DEADLINE
        while not self._healthy():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the gateway did not start; see {self.root / 'gateway.log'}")
            time.sleep(0.2)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def _healthy(self) -> bool:
        try:
            return self.request("GET", "/healthz")[0] == 200
        except OSError:
            return False

    def request(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        conn = http.client.HTTPConnection("127.0.0.1", self.api_port, timeout=300)
        headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
        try:
            conn.request(method, path, None if body is None else json.dumps(body), headers)
            resp = conn.getresponse()
            payload = resp.read()
        finally:
            conn.close()
        return resp.status, json.loads(payload) if payload else None

    def create(self, user: str) -> tuple[float, dict[str, Any]]:
        """POST a session; seconds until it answered (it answers once SSH is ready)."""
        start = time.perf_counter()
        status, body = self.request("POST", "/sessions", {"user_id": user})
        if status != 201:
            raise RuntimeError(f"POST /sessions: {status} {body}")
        return time.perf_counter() - start, body

    def delete(self, session: dict[str, Any]) -> None:
        self.request("DELETE", f"/sessions/{session['session_id']}")

    def cleanup(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        ids = _docker("ps", "-aq", "--filter", f"network={self.network}").split()
        if ids:
            _docker("rm", "-f", *ids)
        for network in (self.network, f"{self.network}-config"):  # -config: Swarm's options
            for _ in range(20):  # Swarm removes a network a moment after its last task
                if not _docker("network", "ls", "-q", "--filter", f"name=^{network}$"):
                    break
                _docker("network", "rm", network)
                time.sleep(0.5)


def _docker(*args: str) -> str:
    return subprocess.run(["docker", *args], capture_output=True, text=True).stdout


def save_key(root: Path, session: dict[str, Any]) -> Path:
    key = root / f"{session['session_id']}.key"
    key.write_text(session["ssh_private_key"])
    key.chmod(0o600)
    return key


def ssh_argv(session: dict[str, Any], key: Path, *, direct: bool) -> list[str]:
    """``ssh`` into the session through its port, or (``direct``) straight to the container."""
    host, port = (session["container_ip"], 22) if direct else ("127.0.0.1", session["ssh_port"])
    return [
        "ssh", "-p", str(port), "-i", str(key), "-o", "IdentitiesOnly=yes",
        "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no",
        "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR",
        "-o", "ConnectTimeout=15", f"{session['ssh_user']}@{host}",
    ]  # fmt: skip


def ssh_transfer(argv: list[str], size: int, *, upload: bool) -> float:
    """Seconds to move ``size`` bytes over ``ssh``, from the session (or to it: ``upload``)."""
    start = time.perf_counter()
    if upload:
        source = subprocess.Popen(["head", "-c", str(size), "/dev/zero"], stdout=subprocess.PIPE)
        subprocess.run([*argv, "cat > /dev/null"], stdin=source.stdout, check=True, timeout=600)
        source.wait()
    else:
        subprocess.run([*argv, f"head -c {size} /dev/zero"], stdout=subprocess.DEVNULL,
                       check=True, timeout=600)  # fmt: skip
    return time.perf_counter() - start


def ssh_bulk(gw: Gateway, root: Path, size: int, rounds: int) -> dict[str, dict[str, float]]:
    """Part 2: ssh download and upload through the session port vs straight to sshd."""
    _, created = gw.create("bulk")
    session = {**created, **gw.request("GET", f"/sessions/{created['session_id']}")[1]}
    key = save_key(root, session)
    results: dict[str, dict[str, list[float]]] = {}
    try:
        for _ in range(rounds):
            for upload in (False, True):
                for direct in (False, True):
                    name = f"ssh {'upload' if upload else 'download'} " + (
                        "direct to the container" if direct else "through the session port"
                    )
                    row = results.setdefault(name, {"mb_per_s": [], "gateway_cpu_s_per_gib": []})
                    before = cpu_seconds(gw.pid)
                    seconds = ssh_transfer(ssh_argv(session, key, direct=direct), size,
                                           upload=upload)  # fmt: skip
                    row["mb_per_s"].append(size / seconds / 1e6)
                    row["gateway_cpu_s_per_gib"].append((cpu_seconds(gw.pid) - before) * GiB / size)
    finally:
        gw.delete(session)
    out = {name: {k: median(v) for k, v in row.items()} for name, row in results.items()}
    for name, row in out.items():
        if "session port" in name:
            row["ratio_to_direct"] = (
                row["mb_per_s"]
                / out[name.replace("through the session port", "direct to the container")][
                    "mb_per_s"
                ]
            )
    return out


async def _template(container_id: str) -> tuple[dict[str, Any], bytes]:
    """A gateway container's create body (without its labels) and the session files the
    gateway copied into it, as one archive: what a bare start of the same thing needs."""
    async with aiodocker.Docker() as docker:
        container = await docker.containers.get(container_id)
        info = await container.show()
        config = {
            "Image": info["Config"]["Image"],
            "Hostname": info["Config"]["Hostname"],
            "Env": info["Config"]["Env"],
            "ExposedPorts": info["Config"].get("ExposedPorts") or {},
            "HostConfig": {k: info["HostConfig"][k] for k in HOST_CONFIG_KEYS},
        }
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w") as out:
            for path in SESSION_FILES:
                archive = await container.get_archive(path)
                parent = Path(path).parent.as_posix().lstrip("/")
                for member in archive.getmembers():
                    data = archive.extractfile(member) if member.isfile() else None
                    member.name = f"{parent}/{member.name}"
                    out.addfile(member, data)
        return config, buffer.getvalue()


async def _sshd_answers(ip: str) -> bool:
    try:
        async with asyncio.timeout(1):
            reader, writer = await asyncio.open_connection(ip, 22)
            line = await reader.readline()
            writer.close()
            return line.startswith(b"SSH-")
    except (OSError, TimeoutError):
        return False


async def _bare_start(config: dict[str, Any], archive: bytes, network: str) -> float:
    """Create, copy the files in, start, and wait until sshd answers: seconds."""
    async with aiodocker.Docker() as docker:
        start = time.perf_counter()
        container = await docker.containers.create(config)
        try:
            await container.put_archive("/", archive)
            await container.start()
            ip = (await container.show())["NetworkSettings"]["Networks"][network]["IPAddress"]
            while True:
                if await _sshd_answers(ip):
                    return time.perf_counter() - start
                await asyncio.sleep(READY_POLL_SECONDS)
        finally:
            await container.delete(force=True)


def create_to_ready(gw: Gateway, count: int) -> dict[str, dict[str, float]]:
    """Part 3: POST-to-ready vs a bare start of the same container, alternating."""
    _, template_session = gw.create("template")
    try:
        ids = _docker("ps", "-q", "--filter", f"network={gw.network}").split()
        config, archive = asyncio.run(_template(ids[0]))
        posts, bares = [], []
        for number in range(count):
            seconds, session = gw.create(f"ready{number}")
            posts.append(seconds)
            gw.delete(session)
            bares.append(asyncio.run(_bare_start(config, archive, gw.network)))
    finally:
        gw.delete(template_session)
    rows = {"POST /sessions to ready": posts, "bare container start to sshd answering": bares}
    out = {k: {"p50_s": percentile(v, 0.5), "p95_s": percentile(v, 0.95)} for k, v in rows.items()}
    out["POST /sessions to ready"]["p50_ratio_to_bare"] = (
        out["POST /sessions to ready"]["p50_s"]
        / out["bare container start to sshd answering"]["p50_s"]
    )
    return out


def many_sessions(gw: Gateway, root: Path, target: int, budget_s: float) -> dict[str, float]:
    """Part 4: as many live sessions as ``target`` or ``budget_s`` of creating allow."""
    base_rss, base_fds = rss_bytes(gw.pid), open_fds(gw.pid)
    sessions: list[dict[str, Any]] = []
    creates: list[float] = []
    deadline = time.monotonic() + budget_s
    try:
        while len(sessions) < target and time.monotonic() < deadline:
            seconds, session = gw.create(f"many{len(sessions)}")
            creates.append(seconds)
            sessions.append(session)
        rss, fds = rss_bytes(gw.pid), open_fds(gw.pid)
        lists = []
        for _ in range(20):
            start = time.perf_counter()
            status, body = gw.request("GET", "/sessions")
            lists.append(time.perf_counter() - start)
            assert status == 200 and len(body) >= len(sessions), body

        def ssh_true(session: dict[str, Any]) -> bool:
            argv = ssh_argv(session, save_key(root, session), direct=False)
            return subprocess.run([*argv, "true"], capture_output=True, timeout=60).returncode == 0

        start = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            ok = sum(pool.map(ssh_true, sessions))
        ssh_seconds = time.perf_counter() - start
    finally:
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            list(pool.map(gw.delete, sessions))
    return {
        "sessions": len(sessions),
        "create_p50_s": percentile(creates, 0.5),
        "create_p95_s": percentile(creates, 0.95),
        "gateway_rss_mib": rss / 2**20,
        "gateway_rss_mib_per_session": (rss - base_rss) / len(sessions) / 2**20,
        "gateway_fds": fds,
        "gateway_fds_per_session": (fds - base_fds) / len(sessions),
        "get_sessions_p50_ms": percentile(lists, 0.5) * 1e3,
        "ssh_true_ok": ok,
        "ssh_true_total_s": ssh_seconds,
    }


def run(root: Path, image: str, *, ssh_size: int, rounds: int, ready_count: int,
        sessions: int, budget_s: float) -> dict[str, Any]:  # fmt: skip
    """Parts 2 to 4 against one gateway."""
    if subprocess.run(["docker", "image", "inspect", image], capture_output=True).returncode:
        raise RuntimeError(f"no image {image} (make images)")
    gw = Gateway(root, image)
    try:
        gw.start()
        return {
            "ssh": ssh_bulk(gw, root, ssh_size, rounds),
            "create_to_ready": create_to_ready(gw, ready_count),
            "many_sessions": many_sessions(gw, root, sessions, budget_s),
            "host": socket.gethostname(),
        }
    finally:
        gw.cleanup()
