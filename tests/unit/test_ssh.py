"""SSH identity: host CA and per-user host keys, public key validation, text formats, and the
API fields and files built from them (fake Docker, real asyncssh)."""

from __future__ import annotations

import os
import stat
import subprocess
from datetime import UTC, datetime

import asyncssh
import bcrypt
import pytest

from gateway.config import EnvError, config_from_args, parse
from gateway.core.ssh import (
    authorized_keys,
    expiry_option,
    known_hosts_line,
    ssh_command,
    sshd_forwarding,
)
from gateway.errors import HostIdentityDamaged, InvalidPublicKey
from gateway.ssh.credentials import (
    new_key_pair,
    new_password,
    parse_public_key,
    parse_public_keys,
)
from gateway.ssh.identity import HostIdentity
from tests.net import UNIT_PORT_BASE as FIRST_PORT
from tests.unit.helpers import create

SK_KEY = (
    "sk-ssh-ed25519@openssh.com AAAAGnNrLXNzaC1lZDI1NTE5QG9wZW5zc2guY29tAAAAIEX/dQ0v4127bEo8eeG"
    "1EV0ApO2lWbSnN6RhusfcmP6wAAAABHNzaDo= yubikey"
)


def keygen(tmp_path, kind: str, bits: int | None = None) -> str:
    path = tmp_path / f"{kind}{bits or ''}"
    args = ["ssh-keygen", "-q", "-t", kind, "-N", "", "-f", str(path)]
    subprocess.run(args + (["-b", str(bits)] if bits else []), check=True)
    return (tmp_path / f"{path.name}.pub").read_text()


# --- text formats -------------------------------------------------------------------------


def test_expiry_option_is_utc_to_the_second():
    moment = datetime(2026, 11, 30, 10, 0, 5, 999, tzinfo=UTC)
    assert expiry_option(moment) == 'expiry-time="20261130100005Z"'
    text = authorized_keys(["ssh-ed25519 AAAA", "ssh-rsa BBBB"], moment)
    assert text == (
        'expiry-time="20261130100005Z" ssh-ed25519 AAAA\n'
        'expiry-time="20261130100005Z" ssh-rsa BBBB\n'
    )


def test_known_hosts_line_covers_port_22_and_every_other_port():
    line = known_hosts_line(("gpu01.lab", "10.0.0.5"), "ssh-ed25519 AAAA sandman-host-ca")
    assert line == (
        "@cert-authority gpu01.lab,[gpu01.lab]:*,10.0.0.5,[10.0.0.5]:* "
        "ssh-ed25519 AAAA sandman-host-ca"
    )


@pytest.mark.parametrize(
    ("agent", "streamlocal", "lines"),
    [
        (True, False, ["AllowAgentForwarding yes", "AllowStreamLocalForwarding no"]),
        (False, False, ["AllowAgentForwarding no", "AllowStreamLocalForwarding no"]),
        (True, True, ["AllowStreamLocalForwarding yes", "StreamLocalBindUnlink yes"]),
        (False, True, ["AllowAgentForwarding no", "AllowStreamLocalForwarding yes"]),
    ],
)
def test_sshd_forwarding_follows_the_settings_and_x11_stays_off(agent, streamlocal, lines):
    text = sshd_forwarding(agent=agent, streamlocal=streamlocal).splitlines()
    assert set(lines) <= set(text)
    assert "X11Forwarding no" in text


@pytest.mark.parametrize(
    ("argv", "env", "agent", "streamlocal"),
    [
        ([], {}, True, False),  # the defaults: agent forwarding on, socket forwarding off
        (["--ssh-agent-forwarding", "off"], {}, False, False),
        (["--ssh-streamlocal-forwarding", "on"], {}, True, True),
        ([], {"SANDMAN_SSH_AGENT_FORWARDING": "no", "SANDMAN_SSH_STREAMLOCAL_FORWARDING": "1"},
         False, True),
    ],
)  # fmt: skip
def test_forwarding_options(argv, env, agent, streamlocal):
    config = config_from_args(parse(["serve", *argv], env=env), env)
    assert (config.ssh_agent_forwarding, config.ssh_streamlocal_forwarding) == (agent, streamlocal)


@pytest.mark.parametrize(
    "argv", [["--ssh-agent-forwarding", "maybe"], ["--ssh-streamlocal-forwarding", ""]]
)
def test_forwarding_options_refuse_anything_but_on_or_off(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        parse(["serve", *argv], env={})
    assert exc.value.code == 2
    assert "expected on or off" in capsys.readouterr().err


def test_a_bad_environment_value_is_refused_naming_its_variable():
    with pytest.raises(EnvError, match="SANDMAN_SSH_AGENT_FORWARDING='sometimes': expected on"):
        parse(["serve"], env={"SANDMAN_SSH_AGENT_FORWARDING": "sometimes"})


def test_ssh_command():
    assert ssh_command("alice", "gpu01.lab", 10001) == "ssh -p 10001 alice@gpu01.lab"


# --- host identity ------------------------------------------------------------------------


def test_ca_and_seed_are_made_once_0600_and_keys_stay_per_user(tmp_path):
    first = HostIdentity.load_or_create(tmp_path, ("gpu01.lab",))
    for name in ("ssh_host_ca", "ssh_host_key_seed"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o600
    again = HostIdentity.load_or_create(tmp_path, ("gpu01.lab", "alias"))
    assert again.ca_public_key == first.ca_public_key
    assert again.fingerprint("alice") == first.fingerprint("alice")
    assert first.fingerprint("alice") != first.fingerprint("bob")
    assert first.fingerprint("alice").startswith("SHA256:")
    other_host = HostIdentity.load_or_create(tmp_path / "elsewhere", ("gpu01.lab",))
    assert other_host.fingerprint("alice") != first.fingerprint("alice")


def test_ca_and_seed_are_written_whole_or_not_at_all(tmp_path, monkeypatch):
    """Temp file, fsync, rename, fsync of the folder: a failure before the rename leaves
    no file (the next start makes it again), never a short one."""
    synced: list[str] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        real_fsync(fd)
        synced.append("dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file")

    monkeypatch.setattr(os, "fsync", fsync)
    HostIdentity.load_or_create(tmp_path / "ok", ("gpu01.lab",))
    assert synced == ["file", "dir", "file", "dir"]  # the CA, then the seed
    assert sorted(p.name for p in (tmp_path / "ok").iterdir()) == [
        "ssh_host_ca", "ssh_host_ca.pub", "ssh_host_key_seed"
    ]  # fmt: skip

    def power_cut(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fsync", power_cut)
    with pytest.raises(OSError):
        HostIdentity.load_or_create(tmp_path / "cut", ("gpu01.lab",))
    assert list((tmp_path / "cut").iterdir()) == []
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert HostIdentity.load_or_create(tmp_path / "cut", ("gpu01.lab",)).fingerprint("alice")


@pytest.mark.parametrize("seed", [b"", b"\0" * 31, b"\0" * 33], ids=["empty", "31", "33"])
def test_a_seed_not_exactly_32_bytes_is_refused(tmp_path, seed):
    """An empty seed would make every user's host key computable by anyone."""
    HostIdentity.load_or_create(tmp_path, ("gpu01.lab",))
    (tmp_path / "ssh_host_key_seed").write_bytes(seed)
    with pytest.raises(HostIdentityDamaged, match=f"holds {len(seed)} bytes, not 32"):
        HostIdentity.load_or_create(tmp_path, ("gpu01.lab",))


def test_an_empty_ca_is_refused_with_a_clear_error(tmp_path):
    HostIdentity.load_or_create(tmp_path, ("gpu01.lab",))
    (tmp_path / "ssh_host_ca").write_bytes(b"")
    with pytest.raises(HostIdentityDamaged, match="ssh_host_ca is not a private key"):
        HostIdentity.load_or_create(tmp_path, ("gpu01.lab",))


def test_certificate_names_every_host_and_the_session(tmp_path):
    identity = HostIdentity.load_or_create(tmp_path, ("gpu01.lab", "10.0.0.5"))
    after = datetime(2026, 1, 1, tzinfo=UTC)
    before = datetime(2026, 1, 3, tzinfo=UTC)
    files = identity.certify("alice", "s1", valid_after=after, valid_before=before)
    cert = asyncssh.import_certificate(files.certificate)
    assert cert.principals == ["gpu01.lab", "10.0.0.5", "sandman-session-s1"]
    cert_file = tmp_path / "cert.pub"
    cert_file.write_bytes(files.certificate)
    listing = subprocess.run(
        ["ssh-keygen", "-L", "-f", str(cert_file)],
        capture_output=True,
        text=True,
        check=True,
        env={"TZ": "UTC"},
    ).stdout
    assert "Type: ssh-ed25519-cert-v01@openssh.com host certificate" in listing
    assert "Valid: from 2026-01-01T00:00:00 to 2026-01-03T00:00:00" in listing
    assert (
        cert.signing_key.public_data
        == asyncssh.import_public_key(identity.ca_public_key).public_data
    )
    key = asyncssh.import_private_key(files.private_key)
    assert key.get_fingerprint("sha256") == identity.fingerprint("alice")
    assert cert.key.public_data == key.public_data


# --- public keys --------------------------------------------------------------------------


def test_accepted_keys_are_normalised(tmp_path):
    for line in (
        keygen(tmp_path, "ed25519"),
        keygen(tmp_path, "ecdsa"),
        keygen(tmp_path, "rsa", 3072),
        SK_KEY,
    ):
        kind, data = line.split()[:2]
        assert parse_public_key(line) == f"{kind} {data}"  # comment dropped


@pytest.mark.parametrize(
    ("line", "says"),
    [
        ("", "single"),
        ("ssh-ed25519", "single"),
        ("ssh-dss AAAAB3NzaC1kc3MAAACBA", "not accepted"),
        ('command="rm -rf ~" ssh-ed25519 AAAAC3NzaC1lZDI1NTE5', "not accepted"),
        ("ssh-ed25519 !!!notbase64", "does not decode"),
        ("ssh-ed25519 AAAA\nssh-ed25519 AAAA", "single"),
    ],
)
def test_bad_key_lines(line, says):
    with pytest.raises(ValueError, match=says):
        parse_public_key(line)


def test_rsa_under_3072_bits_and_mislabelled_keys_are_refused(tmp_path):
    with pytest.raises(ValueError, match="at least 3072"):
        parse_public_key(keygen(tmp_path, "rsa", 2048))
    data = keygen(tmp_path, "ed25519").split()[1]
    with pytest.raises(ValueError, match="does not decode"):  # an ed25519 key called RSA
        parse_public_key(f"ssh-rsa {data}")


def test_key_lists_are_bounded_and_name_the_bad_line(tmp_path):
    good = keygen(tmp_path, "ed25519")
    assert parse_public_keys([good, good]) == (parse_public_key(good),)
    for lines in ([], [good] * 17):
        with pytest.raises(InvalidPublicKey, match="1 to 16"):
            parse_public_keys(lines)
    with pytest.raises(InvalidPublicKey, match=r"ssh_public_keys\[1\]"):
        parse_public_keys([good, 42])


def test_a_key_pair_is_made_only_when_none_is_brought():
    private, public = new_key_pair()
    assert private is not None and private.startswith("-----BEGIN OPENSSH PRIVATE KEY-----")
    assert len(public) == 1 and public[0].startswith("ssh-ed25519 ")
    assert new_key_pair(("ssh-ed25519 AAAA",)) == (None, ("ssh-ed25519 AAAA",))


def test_passwords_are_random_and_hashed_with_bcrypt():
    (one, one_hash), (two, _) = new_password(), new_password()
    assert one != two and len(one) >= 20
    assert bcrypt.checkpw(one.encode(), one_hash.encode())


# --- through the API ----------------------------------------------------------------------


async def test_known_hosts_is_public_text(make_client):
    client = await make_client()
    resp = await client.get("/ssh/known_hosts", headers={"Authorization": ""})
    assert resp.status == 200 and resp.content_type == "text/plain"
    line = await resp.text()
    assert line.startswith("@cert-authority gpu01.test,[gpu01.test]:* ssh-ed25519 ")
    assert line.endswith(" sandman-host-ca\n")


async def test_views_tell_how_to_verify_and_connect(make_client, runtime):
    client = await make_client()
    body = await (await create(client)).json()
    view = await (await client.get(f"/sessions/{body['session_id']}")).json()
    known = (await (await client.get("/ssh/known_hosts")).text()).strip()
    for shown in (body, view):
        assert shown["ssh_known_hosts"] == known
        assert shown["ssh_command"] == f"ssh -p {FIRST_PORT} alice@gpu01.test"
    assert body["ssh_host_key_fingerprint"] == view["ssh_host_key_fingerprint"]
    (container,) = runtime.containers.values()
    key, _ = container.host_key()
    assert key.get_fingerprint("sha256") == body["ssh_host_key_fingerprint"]


async def test_own_keys_reach_the_container_and_no_private_key_is_made(make_client, runtime):
    client = await make_client()
    key = asyncssh.generate_private_key("ssh-ed25519", comment="me@laptop")
    line = key.export_public_key().decode().strip()
    body = await (await create(client, ssh_public_keys=[line])).json()
    assert body["ssh_private_key"] is None
    (container,) = runtime.containers.values()
    text = container.files["/etc/ssh/authorized_keys/alice"].decode()
    assert text == f'expiry-time="20260101010000Z" {line.removesuffix(" me@laptop")}\n'


@pytest.mark.parametrize(
    ("overrides", "agent", "streamlocal"),
    [
        ({}, "yes", "no"),
        ({"ssh_agent_forwarding": False, "ssh_streamlocal_forwarding": True}, "no", "yes"),
    ],
)
async def test_the_session_sshd_forwards_as_configured(
    make_client, runtime, overrides, agent, streamlocal
):
    client = await make_client(**overrides)
    assert (await create(client)).status == 201
    (container,) = runtime.containers.values()
    text = container.files["/etc/ssh/sandman_forwarding.conf"].decode().splitlines()
    assert f"AllowAgentForwarding {agent}" in text
    assert f"AllowStreamLocalForwarding {streamlocal}" in text
    assert "/etc/sandman/tmux-attach" not in container.files  # off unless asked for


async def test_tmux_attach_puts_its_flag_in_the_container(make_client, runtime):
    client = await make_client(tmux_attach=True)
    assert (await create(client)).status == 201
    (container,) = runtime.containers.values()
    assert container.files["/etc/sandman/tmux-attach"] == b"on\n"


@pytest.mark.parametrize(
    ("keys", "status", "code"),
    [
        (["ssh-ed25519 AAAAC3Nza"], 400, "invalid_public_key"),
        ([], 400, "invalid_public_key"),
        ("ssh-ed25519 AAAA", 400, "invalid_request"),  # a string, not a list
    ],
)
async def test_bad_keys_create_nothing(make_client, runtime, keys, status, code):
    client = await make_client()
    resp = await create(client, ssh_public_keys=keys)
    assert (resp.status, (await resp.json())["code"]) == (status, code)
    assert runtime.containers == {}
    assert await (await client.get("/sessions")).json() == []


async def test_patch_moves_key_expiry_and_session_facts(make_client, runtime):
    client = await make_client()
    body = await (await create(client, ttl_minutes=10)).json()
    (container,) = runtime.containers.values()
    keys = container.files["/etc/ssh/authorized_keys/alice"]
    assert b'expiry-time="20260101001000Z"' in keys
    resp = await client.patch(f"/sessions/{body['session_id']}", json={"extend_minutes": 20})
    assert resp.status == 200
    assert b'expiry-time="20260101003000Z"' in container.files["/etc/ssh/authorized_keys/alice"]
    assert b'"expires_at": "2026-01-01T00:30:00Z"' in container.files["/etc/sandman/session.json"]


async def test_patch_that_cannot_reach_the_container_changes_nothing(make_client, runtime):
    client = await make_client()
    body = await (await create(client, ttl_minutes=10)).json()
    runtime.reachable = False
    resp = await client.patch(f"/sessions/{body['session_id']}", json={"extend_minutes": 20})
    assert (resp.status, (await resp.json())["code"]) == (503, "docker_unavailable")
    runtime.reachable = True
    view = await (await client.get(f"/sessions/{body['session_id']}")).json()
    assert view["expires_at"] == "2026-01-01T00:10:00Z"


async def test_another_host_key_at_the_address_fails_the_create(make_client, runtime):
    runtime.mode = "wrong_host_key"
    client = await make_client()
    resp = await create(client)
    assert (resp.status, (await resp.json())["code"]) == (502, "container_start_failed")
    assert runtime.containers == {} and len(runtime.removed) == 1
    assert await (await client.get("/sessions")).json() == []
