"""The ``sandman`` client against a live gateway (fake Docker, real loopback sockets): every
command, its ``--json`` form, and its error exits."""

import asyncio
import io
import json
import logging
import os
import re
import stat
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from aiohttp import ClientSession, web

from gateway.cli import configure_logging, main
from gateway.core.gpu_delivery import gpu_path
from gateway.core.ports import PortRange
from gateway.gpu import nvml
from gateway.gpu.nvml import NvmlBackend
from gateway.gpu.sim import SimBackend
from gateway.runtime import docker as docker_runtime
from tests.fakes import CDI_DOCKER, SWARM_NODES
from tests.net import bindable_unit_port
from tests.unit.conftest import TOKEN
from tests.unit.fake_pynvml import FakeGpu, FakeNvml
from tests.unit.helpers import EXAMPLES, connections_written, hello

HOSTILE_BANNER = b"SSH-2.0-evil\x1b[2J\x1b]0;owned\x07"


class Cli:
    """Runs ``sandman`` in a thread (its own event loop) against the test's gateway."""

    app: web.Application | None = None  # the gateway, when it runs in the test's loop

    def __init__(self, url: str, home: Path) -> None:
        self.url = url
        self.env = {
            "HOME": str(home),
            "PATH": os.environ["PATH"],
            "SANDMAN_URL": url,
            "SANDMAN_TOKEN": TOKEN,
        }

    async def __call__(
        self, *argv: str, env: dict | None = None, typed: str = ""
    ) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()

        def run() -> int:
            try:
                return main(
                    list(argv),
                    env=self.env if env is None else env,
                    out=out,
                    err=err,
                    inp=io.StringIO(typed),
                )
            except SystemExit as exc:  # argparse's usage errors
                return int(exc.code)

        rc = await asyncio.to_thread(run)
        return rc, out.getvalue(), err.getvalue()

    async def json(self, *argv: str):
        rc, out, err = await self(*argv, "--json")
        assert rc == 0, err
        return json.loads(out)


@pytest.fixture
async def cli(make_server, tmp_path):
    server = await make_server()
    cli = Cli(str(server.make_url("")).rstrip("/"), tmp_path / "home")
    cli.app = server.app
    return cli


async def test_login_saves_a_private_config_that_later_commands_use(cli, tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    env = {"HOME": cli.env["HOME"], "PATH": cli.env["PATH"]}
    rc, _, err = await cli("session", "list", env=env)
    assert rc == 2 and "sandman login" in err

    rc, out, err = await cli("login", "--url", cli.url, "--token-file", str(token_file), env=env)
    assert rc == 0, err
    config = Path(cli.env["HOME"]) / ".config" / "sandman" / "config.toml"
    assert str(config) in out
    assert stat.S_IMODE(config.stat().st_mode) == 0o600
    assert tomllib.loads(config.read_text()) == {"url": cli.url, "token": TOKEN}
    rc, out, _ = await cli("session", "list", env=env)
    assert rc == 0 and out.startswith("ID")

    # the environment and then the options override the file
    rc, _, err = await cli("session", "list", env={**env, "SANDMAN_TOKEN": "wrong"})
    assert rc == 1 and "(unauthorized)" in err
    rc, _, _ = await cli("session", "list", "--token", TOKEN, env={**env, "SANDMAN_TOKEN": "x"})
    assert rc == 0

    xdg = {**env, "XDG_CONFIG_HOME": str(tmp_path / "xdg")}
    token_file.write_text("wrong\n")
    rc, _, err = await cli("login", "--url", cli.url, "--token-file", str(token_file), env=xdg)
    assert rc == 1 and "(unauthorized)" in err
    assert not (tmp_path / "xdg").exists()  # a refused login saves nothing
    token_file.write_text(TOKEN)
    rc, _, _ = await cli("login", "--url", cli.url, "--token-file", str(token_file), env=xdg)
    assert rc == 0 and (tmp_path / "xdg" / "sandman" / "config.toml").is_file()
    rc, _, err = await cli("login", "--url", cli.url, "--token-file", str(tmp_path / "no"))
    assert rc == 1 and "cannot read the token file" in err


@dataclass(frozen=True)
class Created:
    """What ``sandman session create alice`` printed and saved."""

    out: str
    key: Path
    known: Path  # the gateway's host CA, so ssh verifies the host
    port: str

    @property
    def ssh(self) -> str:
        return (
            f"ssh -p {self.port} -i {self.key} -o IdentitiesOnly=yes "
            f"-o UserKnownHostsFile={self.known}"
        )


@pytest.fixture
async def alice(cli) -> Created:
    rc, out, err = await cli("session", "create", "alice", "--ttl", "30")
    assert rc == 0, err
    key = Path(cli.env["HOME"]) / ".ssh" / "sandman" / "alice"  # named by user, not session
    port = re.search(r"ssh -p (\d+) ", out).group(1)
    return Created(out=out, key=key, known=key.parent / "known_hosts", port=port)


async def test_create_saves_the_key_and_host_ca_and_prints_the_login(cli, alice):
    assert stat.S_IMODE(alice.key.stat().st_mode) == 0o600
    assert stat.S_IMODE(alice.key.parent.stat().st_mode) == 0o700
    assert alice.key.read_text().startswith("-----BEGIN OPENSSH PRIVATE KEY-----")
    assert f"{alice.ssh} alice@gpu01.test" in alice.out
    assert "(shown this once)" in alice.out and "(in 29m" in alice.out
    assert re.search(r"host key:    SHA256:\S+\n", alice.out)
    ca_line = (await cli.json("session", "show", "alice"))["ssh_known_hosts"]
    assert alice.known.read_text() == ca_line + "\n"


async def test_list_and_show(cli, alice):
    bob = await cli.json("session", "create", "bob")
    assert bob["ssh_private_key"] is None  # saved, not printed
    assert await asyncio.to_thread(Path(bob["ssh_private_key_file"]).is_file)

    rc, out, _ = await cli("session", "list")
    header, *rows = out.splitlines()
    assert header.split() == [
        "ID", "USER", "PORT", "GPU/PROFILE", "STATE", "EXPIRES", "IN", "CONNECTIONS"
    ]  # fmt: skip
    assert [r.split()[1:5] for r in rows] == [
        ["alice", alice.port, "-", "running"],
        ["bob", str(bob["ssh_port"]), "-", "running"],
    ]
    assert [s["user_id"] for s in await cli.json("session", "list")] == ["alice", "bob"]

    shown = await cli.json("session", "show", "alice")
    assert shown == await cli.json("session", "show", shown["id"])  # by user or by id
    rc, out, _ = await cli("session", "show", "alice")
    assert rc == 0 and f"id:          {shown['id']}" in out
    assert f"{alice.ssh} alice@gpu01.test" in out
    assert f"host key:    {shown['ssh_host_key_fingerprint']}" in out


async def test_extend_moves_the_expiry(cli, alice):
    before = datetime.fromisoformat((await cli.json("session", "show", "alice"))["expires_at"])
    extended = await cli.json("session", "extend", "alice", "15")
    assert datetime.fromisoformat(extended["expires_at"]) - before == timedelta(minutes=15)
    rc, out, _ = await cli("session", "extend", extended["id"], "1")
    assert rc == 0 and out.startswith(f"Session {extended['id']} of alice now expires at ")


async def test_connections_show_a_hostile_banner_as_inert_text(cli, alice):
    await hello(int(alice.port), HOSTILE_BANNER)
    await connections_written(cli.app)
    records = (await cli.json("session", "connections", "alice"))["connections"]
    assert [r["client_banner"] for r in records] == [HOSTILE_BANNER.decode()]
    rc, out, _ = await cli("session", "connections", "alice")
    assert rc == 0 and "\x1b" not in out and "SSH-2.0-evil\\x1b[2J\\x1b]0;owned\\x07" in out


async def test_ssh_config_and_ssh_use_the_saved_key_and_host_ca(cli, alice, tmp_path):
    rc, out, _ = await cli("ssh-config", "alice")
    assert out.splitlines() == [
        "Host sandman-alice",
        "    HostName gpu01.test",
        f"    Port {alice.port}",
        "    User alice",
        f"    IdentityFile {alice.key}",
        "    IdentitiesOnly yes",
        f"    UserKnownHostsFile {alice.known}",
    ]

    env, argv_file = stub_ssh(tmp_path, cli.env)
    rc, _, _ = await cli("session", "ssh", "-o", "A=b", "alice", "--", "uname", "-a", env=env)
    assert rc == 3  # ssh's own exit status
    assert argv_file.read_text().splitlines() == [
        "-p", alice.port, "-o", "A=b", "-i", str(alice.key), "-o", "IdentitiesOnly=yes",
        "-o", f"UserKnownHostsFile={alice.known}", "alice@gpu01.test", "uname", "-a",
    ]  # fmt: skip
    rc, _, err = await cli("session", "ssh", "alice", env={**env, "PATH": str(tmp_path / "no")})
    assert rc == 1 and "ssh is not installed" in err


async def test_delete_keeps_the_connection_records(cli, alice):
    await hello(int(alice.port), b"SSH-2.0-client")
    await connections_written(cli.app)
    session_id = (await cli.json("session", "show", "alice"))["id"]
    rc, out, _ = await cli("session", "delete", "alice")
    assert rc == 0 and out == f"session {session_id} deleted\n"
    rc, _, err = await cli("session", "show", "alice")
    assert rc == 1 and "(session_not_found)" in err
    assert (await cli.json("session", "connections", session_id))["count"] == 1

    await cli.json("session", "create", "bob")
    assert (await cli.json("session", "delete", "--all", "--yes"))["deleted"] == 1
    rc, out, _ = await cli("session", "list")
    assert out.splitlines() == [out.splitlines()[0]]  # the header alone


def stub_ssh(tmp_path: Path, env: dict) -> tuple[dict, Path]:
    """An ``ssh`` on PATH that records its arguments and exits 3."""
    stub = tmp_path / "bin"
    stub.mkdir(exist_ok=True)
    (stub / "ssh").write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > {tmp_path}/argv\nexit 3\n')
    (stub / "ssh").chmod(0o755)
    return {**env, "PATH": f"{stub}:{env['PATH']}"}, tmp_path / "argv"


async def test_one_key_file_per_user_replaced_by_each_new_session(cli, tmp_path):
    keys = Path(cli.env["HOME"]) / ".ssh" / "sandman"
    keys.mkdir(parents=True)
    legacy = keys / "alice-0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0"  # an older client's file
    other = keys / "alice-b"  # another user's key file
    for path in (legacy, other):
        path.write_text("old\n")
    first = await cli.json("session", "create", "alice")
    assert first["ssh_private_key_file"] == str(keys / "alice")
    day_one = (await cli("ssh-config", "alice"))[1]
    old_key = (keys / "alice").read_text()
    assert not legacy.exists() and other.read_text() == "old\n"

    assert (await cli("session", "delete", "alice"))[0] == 0
    second = await cli.json("session", "create", "alice")
    assert second["ssh_port"] == first["ssh_port"]  # sticky
    assert (keys / "alice").read_text() != old_key  # the new session's key replaced it
    assert sorted(p.name for p in keys.iterdir()) == [
        "alice", "alice-b", "alice.session", "known_hosts"
    ]  # fmt: skip
    assert (await cli("ssh-config", "alice"))[1] == day_one

    env, argv_file = stub_ssh(tmp_path, cli.env)
    rc, _, err = await cli("session", "ssh", "alice", env=env)
    assert rc == 3 and err == ""
    assert ["-i", str(keys / "alice")] == (argv_file.read_text().splitlines()[2:4])


async def test_ssh_into_a_session_whose_key_this_client_never_saw_says_so(cli, tmp_path):
    await cli.json("session", "create", "alice")  # by another client (another home)
    env, argv_file = stub_ssh(tmp_path, {**cli.env, "HOME": str(tmp_path / "elsewhere")})
    rc, _, err = await cli("session", "ssh", "alice", env=env)
    assert rc == 3
    assert "no key of session" in err and "no password prompt" in err
    argv = argv_file.read_text().splitlines()
    assert "PasswordAuthentication=no" in argv and "KbdInteractiveAuthentication=no" in argv
    assert "-i" not in argv

    rc, _, err = await cli("session", "ssh", "-o", "PasswordAuthentication=yes", "alice", env=env)
    argv = argv_file.read_text().splitlines()
    assert argv.index("PasswordAuthentication=yes") < argv.index("PasswordAuthentication=no")

    session_id = (await cli.json("session", "show", "alice"))["id"]
    legacy = tmp_path / "elsewhere" / ".ssh" / "sandman" / f"alice-{session_id}"
    legacy.parent.mkdir(parents=True, exist_ok=True)
    legacy.write_text("a key an older client saved\n")
    rc, _, err = await cli("session", "ssh", "alice", env=env)
    assert err == "" and ["-i", str(legacy)] == argv_file.read_text().splitlines()[2:4]

    own = await cli.json("session", "create", "bob", "--public-key", str(ed25519_pub(tmp_path)))
    rc, _, err = await cli(
        "session", "ssh", own["session_id"], env={**env, "HOME": cli.env["HOME"]}
    )
    assert rc == 3 and err == ""  # made here with the user's own keys: nothing to say
    assert "PasswordAuthentication=no" not in argv_file.read_text()


def ed25519_pub(tmp_path: Path) -> Path:
    path = tmp_path / "id_own"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", path], check=True)
    return tmp_path / "id_own.pub"


async def test_create_with_public_keys_saves_no_private_key(cli, runtime, tmp_path):
    for name in ("id_a", "id_b"):
        await asyncio.to_thread(
            subprocess.run,
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", name, "-f", tmp_path / name],
            check=True,
        )
    a, b = tmp_path / "id_a.pub", tmp_path / "id_b.pub"
    given = [a.read_text().split()[1], b.read_text().split()[1]]  # server keeps type and base64
    b.write_text("# a comment line, skipped\n\n" + b.read_text())
    created = await cli.json("session", "create", "carol", "--public-key", str(a))
    assert created["ssh_private_key"] is None and created["ssh_private_key_file"] is None
    assert not (Path(cli.env["HOME"]) / ".ssh" / "sandman" / "carol").exists()

    rc, out, err = await cli(
        "session", "create", "dave", "--public-key", str(a), "--public-key", str(b)
    )
    assert rc == 0, err
    assert "private key" not in out and " -i " not in out
    assert re.search(r"ssh -p \d+ -o UserKnownHostsFile=\S+ dave@gpu01.test\n", out)
    (container,) = [
        c for c in runtime.containers.values() if c.spec.labels.get("sandman.user_id") == "dave"
    ]
    authorized = container.files["/etc/ssh/authorized_keys/dave"].decode()
    assert [line.split()[-1] for line in authorized.splitlines()] == given

    a.write_text("ssh-ed25519 not-a-key\n")
    rc, _, err = await cli("session", "create", "erin", "--public-key", str(a))
    assert rc == 1 and "(invalid_public_key)" in err


async def test_errors_print_the_api_message_and_code(cli, tmp_path):
    private = tmp_path / "id_ed25519"
    private.write_text("-----BEGIN OPENSSH PRIVATE KEY-----\nb3Blbn...\n")
    for argv, code in [
        (["session", "create", "Root!"], "invalid_user_id"),
        (["session", "create", "root"], "invalid_user_id"),
        (["session", "create", "erin", "--ttl", "121"], "invalid_ttl"),
        (["session", "create", "erin", "--image", "evil/miner"], "image_not_allowed"),
        (["session", "create", "erin", "--public-key", str(tmp_path / "none")],
         "invalid_public_key"),
        (["session", "create", "erin", "--public-key", str(private)], "invalid_public_key"),
        (["session", "show", "nobody"], "session_not_found"),
        (["session", "extend", "nobody", "5"], "session_not_found"),
        (["session", "delete", "nobody"], "session_not_found"),
        (["session", "connections", "nobody"], "session_not_found"),
        (["ssh-config", "nobody"], "session_not_found"),
    ]:  # fmt: skip
        rc, out, err = await cli(*argv)
        assert (rc, out) == (1, ""), argv
        assert err.startswith("sandman: ") and err.endswith(f"({code})\n"), (argv, err)

    assert (await cli("session", "create", "erin"))[0] == 0
    rc, _, err = await cli("session", "create", "erin")
    assert rc == 1 and "(session_exists)" in err
    rc, _, err = await cli("session", "extend", "erin", "500")
    assert rc == 1 and "(invalid_ttl)" in err

    rc, _, err = await cli("session", "list", "--url", "http://127.0.0.1:9")
    assert rc == 1 and "cannot reach http://127.0.0.1:9" in err
    for usage in (
        ["session", "extend", "erin", "0"],
        ["session", "create", "erin", "--profile", "1g.10gb", "--mig-uuid", "MIG-x"],
        ["session", "delete"],
        ["audit", "--limit", "-1"],
    ):
        assert (await cli(*usage))[0] == 2, usage


async def test_audit_lists_and_follows(cli):
    await cli("session", "create", "alice")
    await cli("session", "create", "bob")
    await cli("session", "delete", "bob")
    events = await cli.json("audit", "--user", "bob")  # newest first, as the API gives them
    sessions = [e["event"] for e in events if e["event"].startswith("session_")]
    assert sessions == ["session_deleted", "session_created"]
    assert {e["user_id"] for e in events} == {"bob"}
    rc, out, _ = await cli("audit", "--limit", "2")  # a table reads oldest first, like a log
    lines = out.splitlines()
    assert rc == 0
    assert lines[0].split() == ["TIME", "EVENT", "USER", "SESSION", "DETAIL"]
    assert len(lines) == 3 and lines[2].split()[3:5] == ["session_deleted", "bob"]

    follow = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway", "audit", "--follow", "--json", "--interval", "0.1",
        "--user", "carol", env=cli.env, stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    seen: list[dict] = []

    async def until(kind: str) -> None:
        async with asyncio.timeout(20):
            while not seen or seen[-1]["event"] != kind:
                seen.append(json.loads(await follow.stdout.readline()))

    try:
        assert (await cli("session", "create", "carol"))[0] == 0
        await until("session_created")
        await cli("session", "delete", "carol")
        await until("session_deleted")
        ids = [e["id"] for e in seen]
        assert ids == sorted(set(ids))  # each event once, oldest first
        assert {e["user_id"] for e in seen} == {"carol"}
    finally:
        follow.kill()
        await follow.wait()


async def test_gpus_shows_slices_holders_and_free(make_server, tmp_path):
    server = await make_server(
        gpu_factory=lambda: SimBackend(EXAMPLES / "topology-mixed.json"),
        default_mig_profile="1g.10gb",
    )
    cli = Cli(str(server.make_url("")).rstrip("/"), tmp_path / "home")
    created = await cli.json("session", "create", "alice", "--profile", "2g.20gb")
    rc, out, _ = await cli("gpus")
    assert rc == 0
    rows = [line.split() for line in out.splitlines()]
    assert rows[0] == ["GPU", "NAME", "SLICE", "UUID", "HELD", "BY"]
    held = [r for r in rows if r and r[-1] == "alice"]
    assert len(held) == 1 and created["gpu_uuid"] in held[0]
    assert "whole GPU" in out
    assert out.splitlines()[-1].startswith("free: ")
    data = await cli.json("gpus")
    assert data["count"] == 3 and {"gpus", "available_instances"} <= set(data)


async def test_gpus_shows_a_released_instance_a_host_process_holds(make_server, tmp_path):
    nv = FakeNvml([FakeGpu("GPU-a80-0000")])
    nv.nvmlInit()
    server = await make_server(gpu_factory=lambda: NvmlBackend(nv), mig_dynamic=True)
    cli = Cli(str(server.make_url("")).rstrip("/"), tmp_path / "home")
    created = await cli.json("session", "create", "alice", "--profile", "1g.10gb")
    (gi,) = nv.gpus[0].gis.values()
    gi.cis[0].held = True  # DCGM, say, on its compute instance
    assert (await cli("session", "delete", "alice"))[0] == 0
    rc, out, _ = await cli("gpus")
    (row,) = [line for line in out.splitlines() if created["gpu_uuid"] in line]
    assert rc == 0 and row.endswith("to destroy")


async def test_gpus_on_a_host_without_gpus_says_so(cli):
    rc, out, _ = await cli("gpus")
    assert (rc, out) == (0, "this host has no GPUs: sessions get none\n")


async def test_nodes_lists_the_machines(cli):
    rc, out, _ = await cli("nodes")
    assert rc == 0
    rows = [line.split() for line in out.splitlines()]
    assert rows[0] == ["NODE", "ROLE", "STATE", "AVAILABILITY", "ADDRESS", "SLICES"]
    assert rows[1] == ["fakehost", "(gateway)", "standalone", "ready", "active", "-", "-"]
    assert (await cli.json("nodes"))["count"] == 1


async def test_gpus_lists_a_swarms_nodes_after_the_gpus(cli, runtime):
    rc, out, _ = await cli("gpus")
    assert (rc, "NODE" in out) == (0, False)  # plain Docker: this host is the only node
    runtime.swarm_nodes = SWARM_NODES
    rc, out, _ = await cli("gpus")
    lines = out.splitlines()
    assert rc == 0 and lines[:2] == ["this host has no GPUs: sessions get none", ""]
    assert [line.split() for line in lines[3:]] == [
        ["worker1", "worker", "ready", "active", "10.0.0.2", "NVIDIA-MIG=MIG-worker-1"],
        ["manager1", "(gateway)", "manager", "ready", "drain", "10.0.0.1", "-"],
    ]
    assert lines[2].split()[0] == "NODE"
    assert [n["hostname"] for n in (await cli.json("gpus"))["nodes"]] == ["worker1", "manager1"]


async def test_gpus_probe_needs_no_gateway(monkeypatch):
    nv = FakeNvml([FakeGpu("GPU-probe-0")])
    monkeypatch.setattr(nvml, "pynvml", nv)  # this machine's GPUs, if any, stay out of it

    async def daemon() -> dict:
        return gpu_path(CDI_DOCKER).view()

    monkeypatch.setattr(docker_runtime, "probe_gpu_path", daemon)
    out, err = io.StringIO(), io.StringIO()
    rc = await asyncio.to_thread(main, ["gpus", "--probe"], env={}, out=out, err=err)
    report = json.loads(out.getvalue())
    assert rc == 0 and report["nvml"] is True and nv.initialised == 0
    assert [g["uuid"] for g in report["gpus"]] == ["GPU-probe-0"]
    assert report["docker"]["through_cdi"] and report["docker"]["delivery"] == "nvidia-runtime"


async def test_create_with_limits_and_show_them(cli):
    created = await cli.json("session", "create", "lim", "--cpus", "0.5", "--memory", "256m")
    assert (created["cpu_limit"], created["memory_limit"]) == (0.5, 256 * 1024**2)
    rc, out, _ = await cli("session", "show", "lim")
    assert rc == 0 and "limits:      0.5 CPUs, 256.0 MiB memory" in out
    await cli.json("session", "create", "free")
    rc, out, _ = await cli("session", "show", "free")
    assert "limits:      unlimited CPUs, unlimited memory" in out
    rc, _, err = await cli("session", "create", "big", "--memory", "lots")
    assert rc == 1 and "(invalid_limit)" in err


async def test_hold_exempt_and_show_idle(cli):
    await cli.json("session", "create", "ida")
    rc, out, _ = await cli("session", "hold", "ida", "90")
    assert rc == 0 and "kept: " in out and "hold" in out and "(hold until " in out
    rc, out, _ = await cli("session", "show", "ida")
    assert "idle:        kept: " in out
    rc, _, err = await cli("session", "hold", "ida", "100000")
    assert rc == 1 and "(invalid_idle_hold)" in err
    released = await cli.json("session", "hold", "ida", "0")
    assert released["idle"]["hold_until"] is None
    exempt = await cli.json("session", "create", "eve", "--no-idle-reclaim")
    shown = await cli.json("session", "show", exempt["session_id"])
    assert shown["idle"]["kept_because"] == ["compute_busy", "exempt"]  # not sampled yet


def test_version(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"], env={})
    assert exc.value.code == 0
    assert re.fullmatch(r"sandman \d+\.\d+\.\d+\n", capsys.readouterr().out)


def test_the_gateway_imports_without_cryptography_warnings():
    code = "import gateway.cli, gateway.api.app"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "Warning" not in done.stderr, done.stderr


async def test_delete_all_asks_first(cli):
    for user in ("alice", "bob"):
        await cli.json("session", "create", user)
    for typed in ("", "n\n", "no\n", "whatever\n"):
        rc, out, err = await cli("session", "delete", "--all", typed=typed)
        assert (rc, out) == (1, "")
        assert "End all 2 sessions (alice, bob)?" in err and "nothing deleted" in err
    assert len(await cli.json("session", "list")) == 2
    rc, out, err = await cli("session", "delete", "--all", typed="y\n")
    assert rc == 0 and "2" in out
    rc, out, err = await cli("session", "delete", "--all")  # nothing to end: nothing to ask
    assert rc == 0 and err == ""


def test_serve_refuses_a_damaged_host_key_seed_with_what_to_do(tmp_path):
    """An empty seed (a crash right after the first start) would make every user's host
    key computable by anyone: the gateway must not serve with it."""
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    (state / "ssh_host_key_seed").write_bytes(b"")
    err = io.StringIO()
    argv = ["serve", "--state-dir", str(state), "--workspace-root", str(tmp_path / "w")]
    assert main(argv, env={}, out=io.StringIO(), err=err) == 1
    assert "ssh_host_key_seed holds 0 bytes, not 32: restore it" in err.getvalue()


async def test_create_wait_follow_queues_then_prints_the_ssh_line(make_server, tmp_path):
    port = bindable_unit_port()
    server = await make_server(ssh_ports=PortRange(port, port))  # one port: full at once
    cli = Cli(str(server.make_url("")).rstrip("/"), tmp_path / "home")
    assert (await cli("session", "create", "ann"))[0] == 0
    rc, out, err = await cli("session", "create", "bob", "--follow")
    assert rc == 1 and "--follow needs --wait" in err
    following = asyncio.create_task(
        cli("session", "create", "bob", "--wait", "--follow", "--interval", "0.05")
    )
    headers = {"Authorization": f"Bearer {TOKEN}"}
    async with ClientSession(headers=headers) as http, asyncio.timeout(10):
        while True:  # another process's state (the CLI's thread): polled
            waiting = (await (await http.get(server.make_url("/queue"))).json())["queue"]
            if waiting:
                break
            await asyncio.sleep(0.05)
    queued_id = waiting[0]["id"]
    rc, shown, _ = await cli("session", "show", queued_id)
    assert rc == 0 and "queued at position 1" in shown
    assert (await cli("session", "delete", "ann"))[0] == 0
    rc, out, err = await asyncio.wait_for(following, 10)
    assert rc == 0, err
    assert "queued at position 1" in out and "password" in out
    assert "is ready" in out and f"ssh -p {port}" in out
    key = re.search(r"-i (\S+)", out)
    assert key is not None and Path(key[1]).name == "bob"  # the key of bob's sessions


@pytest.mark.parametrize(("level", "asyncssh_level"), [("INFO", "WARNING"), ("DEBUG", "DEBUG")])
def test_asyncssh_connection_lines_show_only_at_debug(level, asyncssh_level):
    before = logging.getLogger("asyncssh").level
    try:
        configure_logging(level)
        assert logging.getLevelName(logging.getLogger("asyncssh").level) == asyncssh_level
    finally:
        logging.getLogger("asyncssh").setLevel(before)
