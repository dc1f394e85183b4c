"""A researcher's first minutes in a session: tools, rsync, login message, sandman-session."""

from __future__ import annotations

import json
import re
import subprocess
from datetime import datetime
from typing import Any

from tests.e2e.conftest import docker

# name -> (shell command run as the user, regex its output must match, its exit status)
TOOLS: dict[str, tuple[str, str, int]] = {
    "venv+pip": (
        "python3 -m venv ~/venv && ~/venv/bin/pip --version",
        r"pip \d+\S* from /home/\w+/venv/",
        0,
    ),
    "git": ("git --version", r"git version \d", 0),
    "vim": ("vim --version", r"VIM - Vi IMproved", 0),
    "nano": ("nano --version", r"GNU nano", 0),
    "tmux": ("tmux -V", r"tmux \d", 0),
    "screen": ("screen --version; true", r"Screen version \d", 0),
    "htop": ("htop --version", r"htop \d", 0),
    "curl": ("curl --version", r"(?s)curl \d.*Protocols:.* https", 0),
    "wget": ("wget --version", r"GNU Wget \d", 0),
    "rsync": ("rsync --version", r"rsync +version \d", 0),
    "zip+unzip": (
        "cd /tmp && echo zipped >z.txt && zip -q z.zip z.txt && rm z.txt && unzip -q z.zip"
        " && cat z.txt",
        r"^zipped$",
        0,
    ),
    "less": ("less --version", r"less \d", 0),
    "gcc+make": ("cd /tmp && printf 'int main(void){return 42;}' >t.c && make -s t && ./t", "", 42),
    "python headers": (
        "echo '#include <Python.h>' | gcc -fsyntax-only $(python3-config --includes) -x c -",
        "",
        0,
    ),
    "ssh client": ("ssh -V", r"OpenSSH_\d", 0),
    "locales": ("locale -a", r"(?s)(?=.*^C\.utf8$)(?=.*^en_US\.utf8$)", 0),
    "en_US.UTF-8 usable": ("LC_ALL=en_US.UTF-8 locale charmap", r"\AUTF-8\Z", 0),
    "tzdata": ("TZ=Europe/Berlin date -d 2026-07-01T12:00Z +%Z", r"^CEST$", 0),
    "nvidia-smi without a GPU": ("nvidia-smi", r"this Sandman session has no GPU", 1),
}


def run_tools(ssh: Any, session: dict[str, Any]) -> dict[str, str]:
    """Run every tool command in one login; return each one's output with its exit status."""
    script = "".join(
        f"echo '@@ {name}'; ( {command} ) 2>&1; echo rc=$?\n"
        for name, (command, _, _) in TOOLS.items()
    )
    result = ssh.with_key(session, script)
    assert result.returncode == 0, result.stderr
    outputs = {}
    for chunk in result.stdout.split("@@ ")[1:]:
        name, _, output = chunk.partition("\n")
        outputs[name] = output.rstrip()
    return outputs


def test_every_tool_a_researcher_expects_is_there(gateway, ssh):
    session = gateway.create(user_id="ada").body
    outputs = run_tools(ssh, session)
    failures = []
    for name, (_, pattern, status) in TOOLS.items():
        output, _, rc = ("\n" + outputs.get(name, "<not run>")).rpartition("\nrc=")
        if rc != str(status) or not re.search(pattern, output.strip(), re.M):
            failures.append(f"{name} (exit status {rc}): {output!r}")
    assert not failures, "\n".join(failures)
    assert (gateway.workspaces / "ada" / "venv" / "bin" / "pip").exists()  # in the persistent home


def test_nvidia_smi_stand_in_gives_way_to_the_injected_one(gateway, ssh):
    session = gateway.create(user_id="eda").body
    # As the NVIDIA container toolkit does in GPU sessions: the driver's nvidia-smi in /usr/bin.
    fake = "printf '#!/bin/sh\\necho driver nvidia-smi \"$@\"\\n' >/usr/bin/nvidia-smi"
    docker("exec", session["container_id"], "sh", "-c", f"{fake} && chmod 0755 /usr/bin/nvidia-smi")
    result = ssh.with_key(session, "nvidia-smi -L")
    assert (result.returncode, result.stdout) == (0, "driver nvidia-smi -L\n"), result.stderr


def test_rsync_a_directory_in_and_out_through_the_session_port(gateway, ssh, tmp_path):
    session = gateway.create(user_id="ben").body
    target = f"{session['ssh_user']}@127.0.0.1"
    rsh = ssh.key_command(session)
    source = tmp_path / "data"
    (source / "sub").mkdir(parents=True)
    (source / "notes.txt").write_text("hello\n")
    (source / "sub" / "blob.bin").write_bytes(bytes(range(256)) * 4096)

    def rsync(*args: str) -> None:
        done = subprocess.run(
            ["rsync", "-a", "-e", rsh, *args], capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 0, done.stderr

    rsync(f"{source}/", f"{target}:data/")
    landed = gateway.workspaces / "ben" / "data"
    assert (landed / "sub" / "blob.bin").read_bytes() == (source / "sub" / "blob.bin").read_bytes()
    assert (landed / "notes.txt").stat().st_uid == 10000

    made = ssh.with_key(session, "echo result > ~/data/sub/result.txt")
    assert made.returncode == 0, made.stderr
    back = tmp_path / "back"
    rsync(f"{target}:data/", f"{back}/")
    assert (back / "sub" / "result.txt").read_text() == "result\n"
    assert (back / "notes.txt").read_text() == "hello\n"


def utc_text(stamp: str) -> str:
    return datetime.fromisoformat(stamp).strftime("%Y-%m-%d %H:%M:%S UTC")


def session_facts(ssh: Any, session: dict[str, Any]) -> dict[str, Any]:
    printed = ssh.with_key(session, "sandman-session --json")
    assert printed.returncode == 0, printed.stderr
    return json.loads(printed.stdout)


def test_login_message_and_sandman_session_follow_the_session(gateway, ssh):
    session = gateway.create(user_id="cy", ttl_minutes=30).body
    workspace = gateway.workspaces / "cy"

    shown = ssh.terminal_login(session, "exit\n")
    assert "Sandman session of cy" in shown
    assert f"expires    {utc_text(session['expires_at'])}" in shown
    assert re.search(r"time left  (29|30) min", shown), shown
    assert "none: this session has no GPU, so nvidia-smi is not available" in shown
    assert f"/home/cy is persistent (127.0.0.1:{workspace})" in shown
    assert "files outside /home/cy are lost when the session ends" in shown
    assert "Debian" not in shown  # the distribution's own message of the day is gone
    quiet = ssh.with_key(session, "true")
    assert (quiet.returncode, quiet.stdout) == (0, "")  # commands, scp and rsync see no banner

    facts = session_facts(ssh, session)
    assert facts["session_id"] == session["session_id"]
    assert (facts["user"], facts["home"], facts["gpu"]) == ("cy", "/home/cy", None)
    assert facts["ssh_port"] == session["ssh_port"]

    url = f"/sessions/{session['session_id']}"
    patched = gateway.request("PATCH", url, {"extend_minutes": 60})
    assert patched.status == 200, patched.body
    later = patched.body["expires_at"]
    assert session_facts(ssh, session)["expires_at"] == later  # the PATCH has answered: in place
    printed = ssh.with_key(session, "sandman-session")
    assert f"expires    {utc_text(later)}" in printed.stdout
    assert re.search(r"time left  1 h (29|30) min", printed.stdout), printed.stdout
    assert f"expires    {utc_text(later)}" in ssh.terminal_login(session, "exit\n")
