"""``SANDMAN_<NAME>`` variables in each form (scalar, comma-separated, flag), the command
line winning over them, and a bad value refused in one line (exit 2) by the command that
reads it, never with a traceback and never by commands that do not."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from gateway.cli import main
from gateway.config import config_from_args, parse


def serve_config(argv: list[str], env: dict[str, str]):
    return config_from_args(parse(["serve", *argv], env), env)


@pytest.mark.parametrize(
    ("env", "argv", "field", "expected"),
    [
        ({"SANDMAN_PORT": "9000"}, [], "port", 9000),
        ({"SANDMAN_PORT": "9000"}, ["--port", "9001"], "port", 9001),
        ({"SANDMAN_STATE_DIR": "/srv/s"}, [], "state_dir", Path("/srv/s")),
        ({"SANDMAN_AUDIT_RETENTION_DAYS": "7.5"}, [], "audit_retention_days", 7.5),
        # repeatable: comma-separated, blanks dropped; the command line replaces the list
        ({"SANDMAN_CORS_ORIGIN": "https://a, https://b,"}, [], "cors_origins",
         ("https://a", "https://b")),
        ({"SANDMAN_CORS_ORIGIN": "https://a"}, ["--cors-origin", "https://b"], "cors_origins",
         ("https://b",)),
        ({"SANDMAN_ALLOWED_IMAGE": "x,y"}, ["--allowed-image", "z", "--allowed-image", "w"],
         "allowed_images", ("z", "w")),
        ({"SANDMAN_SSH_HOST_ALIAS": "10.0.0.5,gpu01"}, [], "ssh_host_aliases",
         ("10.0.0.5", "gpu01")),
        ({"SANDMAN_EXPIRY_WARNING": "5m,30s"}, [], "expiry_warnings", (300.0, 30.0)),
        ({"SANDMAN_EXPIRY_WARNING": "5m"}, ["--expiry-warning", "1m"], "expiry_warnings",
         (60.0,)),
        ({}, [], "cors_origins", ()),
        # flags: 1/true/yes/on, 0/false/no/off or empty; the command line sets them
        ({"SANDMAN_MIG_DYNAMIC": "1"}, [], "mig_dynamic", True),
        ({"SANDMAN_MIG_DYNAMIC": "Yes"}, [], "mig_dynamic", True),
        ({"SANDMAN_MIG_DYNAMIC": "on"}, [], "mig_dynamic", True),
        ({"SANDMAN_MIG_DYNAMIC": "0"}, [], "mig_dynamic", False),
        ({"SANDMAN_MIG_DYNAMIC": ""}, [], "mig_dynamic", False),
        ({"SANDMAN_MIG_DYNAMIC": "false"}, ["--mig-dynamic"], "mig_dynamic", True),
        ({}, [], "mig_dynamic", False),
        ({"SANDMAN_NO_EGRESS": "true"}, [], "network_egress", False),
        ({"SANDMAN_NO_SSH_PASSWORD_AUTH": "yes"}, [], "ssh_password_auth", False),
        ({"SANDMAN_NO_SSH_PASSWORD_AUTH": "no"}, [], "ssh_password_auth", True),
    ],
)  # fmt: skip
def test_environment_forms_and_the_command_line_winning(env, argv, field, expected):
    assert getattr(serve_config(argv, env), field) == expected


def run(argv: list[str], env: dict[str, str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    return main(argv, env=env, out=out, err=err), out.getvalue(), err.getvalue()


@pytest.mark.parametrize(
    ("argv", "env", "message"),
    [
        (["serve"], {"SANDMAN_PORT": "x"}, "sandman: SANDMAN_PORT='x': not a whole number\n"),
        (["health"], {"SANDMAN_PORT": "80 80"},
         "sandman: SANDMAN_PORT='80 80': not a whole number\n"),
        (["serve"], {"SANDMAN_REAP_INTERVAL": "soon"},
         "sandman: SANDMAN_REAP_INTERVAL='soon': not a number\n"),
        (["serve"], {"SANDMAN_MIG_DYNAMIC": "maybe"},
         "sandman: SANDMAN_MIG_DYNAMIC='maybe': expected on or off, not 'maybe'\n"),
    ],
)  # fmt: skip
def test_a_bad_variable_is_one_line_and_exit_2(argv, env, message):
    assert run(argv, env) == (2, "", message)


def test_a_bad_variable_is_no_concern_of_commands_that_do_not_read_it(tmp_path):
    """The client's commands take no serve options: a broken SANDMAN_PORT (in a shared
    environment file, say) must not stop them."""
    env = {"SANDMAN_PORT": "x", "HOME": str(tmp_path)}
    rc, _, err = run(["session", "list"], env)
    assert rc == 2 and err.startswith("sandman: no server or token: run `sandman login")


def test_the_command_line_overrides_a_bad_variable():
    assert serve_config(["--port", "9000"], {"SANDMAN_PORT": "x"}).port == 9000


def test_a_bad_option_is_still_argparses_usage_error(capsys):
    with pytest.raises(SystemExit) as exited:
        parse(["serve", "--port", "x"], {})
    assert exited.value.code == 2
    assert "argument --port: invalid int value: 'x'" in capsys.readouterr().err
