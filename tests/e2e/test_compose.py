"""The Compose deployment as an operator runs it: docker-compose.yml builds both images with
no network, brings the gateway up, serves a session over ssh, keeps it across a restart of
the gateway container, and ``down`` leaves no container, network or listener behind.

The stack gets its own project name, API port, session ports, Docker network and folders
(under the test's tmp folder, mounted at the same path as the file says), so it never
meets a production stack or another test. It uses ``SANDMAN_COMPOSE`` if set, else
Debian's ``docker-compose`` (v1) where installed, else ``docker compose`` (v2).
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.e2e.conftest import (
    Gateway,
    SshClient,
    docker,
    port_block,
    port_refuses,
    wait_for,
)

REPO = Path(__file__).resolve().parents[2]
GATEWAY_IMAGE = os.environ.get("SANDMAN_GATEWAY_IMAGE", "sandman-gateway:latest")
GATEWAY_BASE_IMAGE = os.environ.get("SANDMAN_GATEWAY_BASE_IMAGE", "sandman-python:bookworm")
WORKSPACE_BASE_IMAGE = os.environ.get("SANDMAN_BASE_IMAGE", "sandman-tools:bookworm")
HEALTHY_DEADLINE = 90.0  # the image's healthcheck runs every 15 s


def compose_command() -> list[str]:
    if override := os.environ.get("SANDMAN_COMPOSE"):
        return override.split()
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    return ["docker", "compose"]


@dataclass
class Stack:
    """One Compose project of docker-compose.yml and the gateway it runs."""

    project: str
    env: dict[str, str]
    gateway: Gateway

    def run(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*compose_command(), "-p", self.project, "-f", str(REPO / "docker-compose.yml"), *args],
            cwd=REPO,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def compose(self, *args: str) -> str:
        done = self.run(*args)
        if done.returncode != 0:
            raise AssertionError(f"{' '.join(args)} failed:\n{done.stdout}\n{done.stderr}")
        return done.stdout.strip()

    def gateway_container(self) -> str:
        return self.compose("ps", "-q", "gateway")

    def health(self) -> str:
        return docker("inspect", "-f", "{{.State.Health.Status}}", self.gateway_container())

    def answers(self) -> bool:
        try:
            return self.gateway.request("GET", "/healthz").status == 200
        except OSError:
            return False

    def leftovers(self) -> list[str]:
        """Containers and networks of the project, and session containers, still there."""
        project = f"label=com.docker.compose.project={self.project}"
        return [
            *docker("ps", "-aq", "--filter", project).split(),
            *docker("network", "ls", "-q", "--filter", project).split(),
            *self.gateway.containers(),
        ]


def active(gateway: Gateway, path: str, token: str) -> int:
    return gateway.request("GET", path, token=token).body["active_connections"]


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    for image in (GATEWAY_BASE_IMAGE, WORKSPACE_BASE_IMAGE):
        if subprocess.run(["docker", "image", "inspect", image], capture_output=True).returncode:
            pytest.fail(f"the Compose test needs the base image {image} (run: make images)")
    if not (REPO / "build" / "wheels" / "STAMP").is_file():
        pytest.fail("the Compose test needs build/wheels (run: make images)")
    if subprocess.run([*compose_command(), "version"], capture_output=True).returncode:
        pytest.fail(f"the Compose test needs {' '.join(compose_command())} (run: make setup)")

    project = f"sandman-e2e-{secrets.token_hex(4)}"
    first, last = port_block()
    gateway = Gateway(
        root=tmp_path / "compose",
        network=f"sandman-test-{secrets.token_hex(4)}",
        port_start=first,
        port_end=last,
    )
    options = tmp_path / "gateway.env"
    options.write_text(
        "\n".join(
            f"SANDMAN_{name}={value}"
            for name, value in {
                "HOST": "127.0.0.1",
                "PORT": gateway.api_port,
                "SSH_BIND": "127.0.0.1",
                "PUBLIC_HOST": "127.0.0.1",
                "SSH_PORT_START": first,
                "SSH_PORT_END": last,
                "DOCKER_NETWORK": gateway.network,
                "GPUS": "none",
                "LOG_LEVEL": "DEBUG",
            }.items()
        )
        + "\n"
    )
    env = {name: value for name, value in os.environ.items() if not name.startswith("SANDMAN_")}
    env.update(
        SANDMAN_ENV_FILE=str(options),
        SANDMAN_STATE_DIR=str(gateway.state_dir),
        SANDMAN_WORKSPACE_ROOT=str(gateway.workspaces),
        SANDMAN_IMAGE=f"sandman-e2e-workspace:{project}",
        SANDMAN_BASE_IMAGE=WORKSPACE_BASE_IMAGE,
        SANDMAN_GATEWAY_IMAGE=GATEWAY_IMAGE,
        SANDMAN_GATEWAY_BASE_IMAGE=GATEWAY_BASE_IMAGE,
    )
    made = Stack(project, env, gateway)
    try:
        yield made
    finally:
        print(made.run("logs", "--no-color").stdout)  # pytest shows it when the test failed
        made.run("down", "--remove-orphans", "-t", "10")
        gateway.cleanup()
        docker("rmi", env["SANDMAN_IMAGE"], check=False)


def test_compose_stack_serves_sessions_across_a_restart_and_leaves_nothing(
    stack: Stack, ssh: SshClient
):
    gateway = stack.gateway
    started = time.monotonic()
    stack.compose("build", "gateway")
    stack.compose("--profile", "build", "build", "workspace-image")
    built = time.monotonic()
    stack.compose("up", "-d", "--no-build", "gateway")
    assert stack.leftovers(), "the check for leftovers after down must see the stack while up"
    wait_for(stack.answers, timeout=60, what="the composed gateway to answer /healthz")
    assert docker("exec", stack.gateway_container(), "sandman", "health").startswith("200")

    token_file = gateway.state_dir / "api-token"
    assert f"(bearer token: {token_file})" in stack.compose("logs", "--no-color", "gateway")
    token = token_file.read_text().strip()
    created = gateway.request("POST", "/sessions", {"user_id": "composer"}, token=token)
    assert created.status == 201, created.body
    session = created.body
    assert (session["ssh_host"], session["ssh_port"]) == ("127.0.0.1", gateway.port_start)

    login = ssh.with_key(session, "echo from-compose > ~/note.txt && id -u")
    assert login.returncode == 0, login.stderr
    note = gateway.workspaces / "composer" / "note.txt"
    assert note.read_text() == "from-compose\n"
    assert note.stat().st_uid == int(login.stdout)

    wait_for(
        lambda: stack.health() == "healthy",
        timeout=HEALTHY_DEADLINE,
        what="Docker to report the gateway healthy",
    )
    path = f"/sessions/{session['session_id']}"
    # A restart (and an upgrade: a new container from the image) cuts live connections;
    # the session, its container and its port stay, and the user logs in again.
    for cycle in (
        ("restart", "gateway"),
        ("up", "-d", "--no-build", "--force-recreate", "gateway"),
    ):
        live = ssh.start_with_key(session, "sleep 600")
        wait_for(lambda: active(gateway, path, token) == 1, timeout=30, what="a live connection")
        stack.compose(*cycle)
        assert live.wait(timeout=30) != 0
        wait_for(stack.answers, timeout=60, what=f"the gateway to answer /healthz after {cycle}")
        assert gateway.request("GET", path, token=token).status == 200
        again = ssh.with_key(session, "cat ~/note.txt")
        assert (again.returncode, again.stdout) == (0, "from-compose\n"), again.stderr

    assert gateway.request("DELETE", path, token=token).status == 200
    stack.compose("down", "-t", "30")
    assert stack.leftovers() == []
    assert port_refuses(gateway.api_port) and port_refuses(session["ssh_port"])
    print(f"compose build {built - started:.1f} s, run {time.monotonic() - built:.1f} s")
