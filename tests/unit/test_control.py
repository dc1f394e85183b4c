"""The control channel: the in-container ``sandman-control`` (run as sshd would, on a folder
standing in for ``/``) and the key line the gateway gives each session."""

from __future__ import annotations

import base64
import grp
import json
import os
import subprocess
import sys
from pathlib import Path

import asyncssh
import pytest

from gateway.core.idle import Reading
from gateway.runtime.base import CommandResult
from gateway.ssh.control import (
    CONTROL_COMMAND,
    ROOT_AUTHORIZED_KEYS,
    ControlChannel,
    gpu_listing,
    gpu_reading,
)
from gateway.ssh.identity import HostIdentity

SCRIPT = Path(__file__).parents[2] / "workspace-image" / "session" / "sandman-control"


@pytest.fixture
def root(tmp_path: Path) -> Path:
    for folder in ("etc/sandman", "etc/ssh/authorized_keys"):
        (tmp_path / folder).mkdir(parents=True)
    (tmp_path / "etc/sandman/session.json").write_text("{}\n")
    return tmp_path


def control(
    root: Path, request: object, path: str | None = None
) -> subprocess.CompletedProcess[str]:
    text = request if isinstance(request, str) else json.dumps(request)
    env = {**os.environ, "SANDMAN_CONTROL_ROOT": str(root), "PATH": path or os.environ["PATH"]}
    return subprocess.run([sys.executable, str(SCRIPT)], input=text, env=env,
                          capture_output=True, text=True, timeout=30)  # fmt: skip


def entry(path: str, content: bytes, mode: int = 0o644) -> dict[str, object]:
    return {"path": path, "content": base64.b64encode(content).decode(), "mode": mode}


def test_writes_the_session_facts_idle_clocks_and_a_users_keys_atomically(root):
    request = {
        "files": [
            entry("/etc/sandman/session.json", b'{"expires_at": "later"}\n'),
            entry("/etc/sandman/idle.json", b'{"reclaim_at": null}\n'),
            entry("/etc/ssh/authorized_keys/alice", b"ssh-ed25519 AAAA\n"),
        ]
    }
    done = control(root, request)
    assert (done.returncode, done.stderr) == (0, "")
    assert (root / "etc/sandman/session.json").read_text() == '{"expires_at": "later"}\n'
    assert (root / "etc/sandman/idle.json").read_text() == '{"reclaim_at": null}\n'
    keys = root / "etc/ssh/authorized_keys/alice"
    assert keys.read_text() == "ssh-ed25519 AAAA\n"
    assert keys.stat().st_mode & 0o777 == 0o644
    assert not [p for p in root.rglob(".sandman-control-*")]  # no temporary file left


@pytest.mark.parametrize(
    ("request_", "says"),
    [
        ({"files": [entry("/etc/ssh/authorized_keys/root", b"x")]}, "not a file"),
        ({"files": [entry("/etc/passwd", b"x")]}, "not a file"),
        ({"files": [entry("/etc/ssh/authorized_keys/../shadow", b"x")]}, "not a file"),
        ({"files": [entry("/etc/sandman/session.json", b"x", 0o4755)]}, "mode"),
        ({"files": [{"path": "/etc/sandman/session.json", "content": "!!", "mode": 420}]},
         "malformed"),
        ("not json", "malformed"),
        ({"exec": "id"}, "not a request"),
        ({"read": "memory"}, "not a request"),
        ({"read": "gpus", "wall": "hi"}, "malformed"),
        ({"read": ["gpus"]}, "not a request"),
        (["wall", "hi"], "malformed"),
        ({"wall": ""}, "malformed"),
        ({"wall": 3}, "malformed"),
        ({"wall": "hi", "files": []}, "malformed"),
        ({"wall": "x" * 4097}, "more than 4096 bytes"),
        ({"wall": "\x1b]0;owned\x07hi"}, "control characters"),
    ],
)  # fmt: skip
def test_refuses_anything_else_and_writes_nothing(root, request_, says):
    before = (root / "etc/sandman/session.json").read_text()
    done = control(root, request_)
    assert done.returncode == 2 and says in done.stderr
    assert (root / "etc/sandman/session.json").read_text() == before
    assert not (root / "etc/ssh/authorized_keys/root").exists()


def test_the_sessions_root_key_line_forces_the_command_and_nothing_else(tmp_path):
    identity = HostIdentity.load_or_create(tmp_path, ("gpu01.test",))
    channel = ControlChannel.open(tmp_path, identity)
    file = channel.authorized_keys_file()
    assert file.path == ROOT_AUTHORIZED_KEYS and file.mode == 0o644
    options, key_type, key, comment = file.content.decode().split()
    assert options == f'restrict,command="{CONTROL_COMMAND}"'
    assert (key_type, comment) == ("ssh-ed25519", "sandman-control")
    assert (tmp_path / "control_ed25519").stat().st_mode & 0o777 == 0o600
    again = ControlChannel.open(tmp_path, identity).authorized_keys_file()
    assert again == file  # the same key after a restart
    asyncssh.import_public_key(f"{key_type} {key}")


@pytest.fixture
def fake_wall(tmp_path: Path) -> tuple[str, Path]:
    """A ``wall`` on PATH that notes its group, arguments and stdin."""
    bin_dir, said = tmp_path / "bin", tmp_path / "said"
    bin_dir.mkdir()
    wall = bin_dir / "wall"
    wall.write_text(f'#!/bin/sh\n{{ id -g; echo "args:$#"; cat; }} > {said}\n')
    wall.chmod(0o755)
    return f"{bin_dir}:{os.environ['PATH']}", said


@pytest.mark.skipif(os.geteuid() != 0, reason="runs wall with the tty group, as root does")
def test_wall_writes_the_text_from_stdin_with_the_tty_group(root, fake_wall):
    path, said = fake_wall
    done = control(root, {"wall": "-n this session ends in 5 minutes\n\tsave your work"}, path)
    assert (done.returncode, done.stderr) == (0, "")
    group = str(grp.getgrnam("tty").gr_gid)
    assert (
        said.read_text() == f"{group}\nargs:0\n-n this session ends in 5 minutes\n\tsave your work"
    )


def test_a_refused_message_reaches_no_terminal(root, fake_wall):
    path, said = fake_wall
    assert control(root, {"wall": "\x07" * 3}, path).returncode == 2
    assert not said.exists()


@pytest.mark.parametrize(
    ("files", "seconds"),
    [
        ({"sys/fs/cgroup/cpu.stat": "usage_usec 2500000\nuser_usec 2000000\n"}, 2.5),
        ({"sys/fs/cgroup/cpuacct/cpuacct.usage": "1500000000\n"}, 1.5),
        ({"sys/fs/cgroup/cpu,cpuacct/cpuacct.usage": "250000000\n"}, 0.25),
    ],
)
def test_reads_the_sessions_cgroup_cpu_time(root, files, seconds):
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    done = control(root, {"read": "cpu"})
    assert (done.returncode, done.stderr) == (0, "")
    assert json.loads(done.stdout) == {"cpu_seconds": seconds}


def test_no_cgroup_cpu_accounting_is_a_failure_not_a_zero(root):
    done = control(root, {"read": "cpu"})
    assert done.returncode == 1 and "no cgroup CPU accounting" in done.stderr
    assert done.stdout == ""


def fake_nvidia_smi(tmp_path: Path, script: str) -> str:
    """A PATH whose ``nvidia-smi`` runs ``script`` (sh), as the toolkit's would."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "nvidia-smi").write_text(f"#!/bin/sh\n{script}\n")
    (bin_dir / "nvidia-smi").chmod(0o755)
    return f"{bin_dir}:{os.environ['PATH']}"


LISTING = "GPU 0: NVIDIA A100 (UUID: GPU-1)\n  MIG 1g.10gb     Device  0: (UUID: MIG-1)\n"


@pytest.mark.parametrize(
    ("script", "answer"),
    [
        (f"[ \"$*\" = -L ] && printf '{LISTING}'", {"exit_code": 0, "output": LISTING}),
        ("echo 'Failed to initialize NVML: Unknown Error' >&2; exit 255",
         {"exit_code": 255, "output": "Failed to initialize NVML: Unknown Error\n"}),
    ],
)  # fmt: skip
def test_lists_the_gpus_nvidia_smi_sees_with_its_exit_status(root, tmp_path, script, answer):
    done = control(root, {"read": "gpus"}, fake_nvidia_smi(tmp_path, script))
    assert (done.returncode, done.stderr) == (0, "")
    assert json.loads(done.stdout) == answer


def test_a_missing_nvidia_smi_is_an_answer_not_a_failure(root, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    done = control(root, {"read": "gpus"}, str(empty))
    assert (done.returncode, done.stderr) == (0, "")
    assert json.loads(done.stdout) == {"exit_code": 127, "output": "nvidia-smi: not found"}


@pytest.mark.parametrize(
    ("answer", "result"),
    [
        ('{"exit_code": 0, "output": "GPU 0: x"}\n', CommandResult(0, "GPU 0: x")),
        ('{"exit_code": 127, "output": "not found"}', CommandResult(127, "not found")),
        ('{"cpu_seconds": 1.5}', None),  # another request's answer
        ('{"exit_code": "0", "output": ""}', None),
        ('{"exit_code": true, "output": ""}', None),
        ('{"exit_code": 0, "output": null}', None),
        ('{"exit_code": 0, "output": "", "more": 1}', None),
        ('[0, ""]', None),
        ("", None),
        ("sandman-control: not json", None),
    ],
)  # fmt: skip
def test_the_gateway_reads_the_gpu_listing_answer_strictly(answer, result):
    assert gpu_listing(answer) == result


#: a node's ``nvidia-smi`` as a MIG device shows it: a process runs, no utilisation
MIG_SMI = """case "$1" in
  --query-compute-apps=pid,used_memory) [ "$2" = --format=csv,noheader ] && echo '4242, 310 MiB';;
  --query-gpu=utilization.gpu) [ "$2" = --format=csv,noheader,nounits ] && echo '[N/A]';;
  *) echo "unexpected: $*"; exit 2;;
esac"""


def test_reads_what_the_visible_gpu_is_doing(root, tmp_path):
    done = control(root, {"read": "gpu"}, fake_nvidia_smi(tmp_path, MIG_SMI))
    assert (done.returncode, done.stderr) == (0, "")
    assert json.loads(done.stdout) == {
        "apps": {"exit_code": 0, "output": "4242, 310 MiB\n"},
        "utilization": {"exit_code": 0, "output": "[N/A]\n"},
    }
    assert gpu_reading(done.stdout) == Reading(None, processes=True)


def test_a_missing_or_hanging_nvidia_smi_is_a_gpu_reading_too(root, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    missing = control(root, {"read": "gpu"}, str(empty))
    assert (missing.returncode, missing.stderr) == (0, "")
    assert json.loads(missing.stdout)["apps"] == {
        "exit_code": 127,
        "output": "nvidia-smi: not found",
    }
    assert gpu_reading(missing.stdout) is None  # unknown: busy
    hangs = fake_nvidia_smi(tmp_path, 'case "$1" in --query-compute-apps*) sleep 60;; esac; echo 0')
    hung = control(root, {"read": "gpu"}, hangs)
    assert (hung.returncode, hung.stderr) == (0, "")
    answer = json.loads(hung.stdout)
    assert answer["apps"]["exit_code"] == 124 and answer["utilization"] == {
        "exit_code": 0,
        "output": "0\n",
    }
    assert gpu_reading(hung.stdout) is None


@pytest.mark.parametrize(
    ("answer", "result"),
    [
        (json.dumps({"apps": {"exit_code": 0, "output": ""},
                     "utilization": {"exit_code": 0, "output": "3\n"}}),
         Reading(3.0, processes=False)),
        (json.dumps({"apps": {"exit_code": 0, "output": ""}}), None),
        (json.dumps({"apps": {"exit_code": 0, "output": ""}, "utilization": None}), None),
        (json.dumps({"apps": {"exit_code": 0, "output": ""},
                     "utilization": {"exit_code": 0, "output": "3"}, "more": 1}), None),
        ('{"exit_code": 0, "output": ""}', None),  # another request's answer
        ("", None),
    ],
)  # fmt: skip
def test_the_gateway_reads_the_gpu_reading_answer_strictly(answer, result):
    assert gpu_reading(answer) == result
