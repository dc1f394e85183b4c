"""The client's pure parts: naming a session, the config file, and terminal-safe output."""

import io
import stat
import tomllib

import pytest

from gateway.client import format as fmt
from gateway.client.http import ApiError, pick_session
from gateway.client.keys import ssh_config, ssh_host
from gateway.client.settings import Settings, SettingsError, config_path, resolve, save

SESSIONS = [
    {"id": "s1", "user_id": "alice"},
    {"id": "s2", "user_id": "bob"},
    {"id": "s3", "user_id": "bob"},
    {"id": "carol", "user_id": "dave"},
    {"id": "s5", "user_id": "carol"},
]


@pytest.mark.parametrize(
    ("ref", "expected"),
    [("s1", "s1"), ("alice", "s1"), ("s3", "s3"), ("carol", "carol")],  # an id wins over a user
)
def test_pick_session_by_id_or_user(ref, expected):
    assert pick_session(SESSIONS, ref)["id"] == expected


@pytest.mark.parametrize(("ref", "code"), [("bob", "ambiguous"), ("eve", "session_not_found")])
def test_pick_session_refuses(ref, code):
    with pytest.raises(ApiError) as caught:
        pick_session(SESSIONS, ref)
    assert caught.value.code == code


def test_config_round_trips_any_text_and_is_private(tmp_path):
    odd = 'tok"en\\with\ttabs\x7f\x01 and ünïcode'
    path = config_path({"HOME": str(tmp_path)})
    save(path, Settings(url="http://h:1", token=odd))
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert tomllib.loads(path.read_text()) == {"url": "http://h:1", "token": odd}
    assert resolve(None, None, {"HOME": str(tmp_path)}) == Settings("http://h:1", odd)
    assert resolve("http://o/", None, {"HOME": str(tmp_path)}).url == "http://o"


def test_config_errors(tmp_path):
    env = {"HOME": str(tmp_path), "XDG_CONFIG_HOME": str(tmp_path / "x")}
    assert config_path(env) == tmp_path / "x" / "sandman" / "config.toml"
    with pytest.raises(SettingsError, match="sandman login"):
        resolve(None, "t", env)
    config_path(env).parent.mkdir(parents=True)
    config_path(env).write_text("url = [")
    with pytest.raises(SettingsError, match="cannot read"):
        resolve(None, None, env)
    config_path(env).write_text("url = 5\ntoken = 't'\n")
    with pytest.raises(SettingsError, match="url must be a string"):
        resolve(None, None, env)


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(5, "5s"), (65, "1m 05s"), (3600 * 3 + 420, "3h 07m"), (86400 * 2 + 3600 * 4, "2d 04h")],
)
def test_span(seconds, text):
    assert fmt.span(seconds) == text


def test_table_shows_hostile_text_literally():
    out = io.StringIO()
    fmt.table(out, ["A", "B"], [["x\x1b[2Jy", "line\nbreak"], [None, 7]])
    assert out.getvalue().splitlines() == [
        "A          B",
        "x\\x1b[2Jy  line\\nbreak",
        "-          7",
    ]
    out = io.StringIO()
    fmt.table(out, ["ONLY"], [])
    assert out.getvalue() == "ONLY\n"


def test_host_and_ssh_config_from_what_the_api_gives(tmp_path):
    env = {"HOME": str(tmp_path / "my home")}
    view = {"id": "s1", "user_id": "alice", "ssh_port": 10001}
    assert ssh_host(view, "http://gw:8080") == "gw"
    assert ssh_host({**view, "ssh_command": "ssh -p 10001 alice@gpu01.lab"}, "http://gw") == (
        "gpu01.lab"
    )
    known = "@cert-authority gpu01.lab,[gpu01.lab]:* ssh-ed25519 AAAA sandman-host-ca"
    block = ssh_config(env, {**view, "ssh_host": "gpu01.lab", "ssh_known_hosts": known}, "u")
    kh = tmp_path / "my home" / ".ssh" / "sandman" / "known_hosts"
    assert block.splitlines() == [
        "Host sandman-alice",
        "    HostName gpu01.lab",
        "    Port 10001",
        "    User alice",
        f'    UserKnownHostsFile "{kh}"',
    ]
    ssh_config(env, {**view, "ssh_known_hosts": known}, "u")
    assert kh.read_text() == known + "\n"  # kept once
