"""The client's command line: ``session ...``, ``audit``, ``gpus``, ``nodes``, ``ssh-config``,
``login``."""

from __future__ import annotations

import argparse
from pathlib import Path

from gateway.client import commands

COMMAND = "client_command"


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _minutes(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError("cannot be negative")
    return value


def _seconds(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError("must be positive")
    return value


def add_client_commands(sub: argparse._SubParsersAction) -> None:
    """Add the client's subcommands to the ``sandman`` parser's ``sub``."""
    server = argparse.ArgumentParser(add_help=False)
    server.add_argument("--url", help="gateway URL (env SANDMAN_URL; else the config file)")
    server.add_argument("--token", help="API token (env SANDMAN_TOKEN; else the config file)")
    listing = argparse.ArgumentParser(add_help=False, parents=[server])
    listing.add_argument("--json", action="store_true", help="print the API's JSON")

    def command(
        parent: argparse._SubParsersAction,
        name: str,
        run: commands.Command,
        help_text: str,
        *,
        json: bool = True,
    ) -> argparse.ArgumentParser:
        parser = parent.add_parser(
            name, help=help_text, description=help_text, parents=[listing if json else server]
        )
        parser.set_defaults(**{COMMAND: run})
        return parser

    login = sub.add_parser(
        "login", help="check a gateway URL and token, and save them for later commands"
    )
    login.add_argument("--url", required=True, help="gateway URL, e.g. http://gpu01:8080")
    login.add_argument("--token-file", required=True, type=Path, help="file holding the token")

    session = sub.add_parser("session", help="create, list, show, extend, hold, delete sessions")
    actions = session.add_subparsers(dest="action", required=True, metavar="ACTION")
    ref = "session id, or user name when the user has one live session"

    create = command(actions, "create", commands.session_create, "create a session for USER")
    create.add_argument("user", metavar="USER")
    create.add_argument("--ttl", type=_positive, metavar="MINUTES", help="time to live")
    gpu = create.add_mutually_exclusive_group()
    gpu.add_argument("--profile", help="MIG profile, e.g. 3g.40gb")
    gpu.add_argument("--mig-uuid", help="a MIG instance by UUID")
    create.add_argument("--image", help="workspace image (one the gateway allows)")
    create.add_argument("--cpus", type=float, help="CPU limit, e.g. 1.5 (within the gateway's)")
    create.add_argument("--memory", help="memory limit, e.g. 8g or 512m (within the gateway's)")
    create.add_argument(
        "--public-key",
        action="append",
        type=Path,
        metavar="FILE",
        help="log in with this OpenSSH public key instead of a generated one (repeatable)",
    )
    create.add_argument(
        "--wait",
        action="store_true",
        help="when no GPU is free, join the waiting list instead of failing",
    )
    create.add_argument(
        "--follow",
        action="store_true",
        help="with --wait: wait until the session runs, then print how to log in",
    )
    create.add_argument(
        "--interval", type=float, default=2.0, help=argparse.SUPPRESS
    )  # --follow's polling period (tests shorten it)

    create.add_argument(
        "--no-idle-reclaim",
        action="store_true",
        help="never end this session for being idle (it still ends at its TTL)",
    )

    command(actions, "list", commands.session_list, "list live sessions")
    show = command(actions, "show", commands.session_show, "show one session")
    show.add_argument("session", metavar="ID|USER", help=ref)
    extend = command(actions, "extend", commands.session_extend, "extend a session's TTL")
    extend.add_argument("session", metavar="ID|USER", help=ref)
    extend.add_argument("minutes", type=_positive, metavar="MINUTES")
    hold = command(
        actions, "hold", commands.session_hold, "keep a session from idle reclaim for a while"
    )
    hold.add_argument("session", metavar="ID|USER", help=ref)
    hold.add_argument(
        "minutes", type=_minutes, metavar="MINUTES", help="how long; 0 releases the hold"
    )
    delete = command(actions, "delete", commands.session_delete, "end a session now")
    target = delete.add_mutually_exclusive_group(required=True)
    target.add_argument("session", nargs="?", metavar="ID|USER", help=ref)
    target.add_argument("--all", action="store_true", help="end every session (asks first)")
    delete.add_argument("-y", "--yes", action="store_true", help="with --all: do not ask")
    conns = command(
        actions, "connections", commands.session_connections, "a session's connection history"
    )
    conns.add_argument("session", metavar="ID|USER", help=ref + " (an id also after it ended)")
    ssh = command(
        actions, "ssh", commands.session_ssh, "ssh into a session with its saved key", json=False
    )
    ssh.add_argument(
        "-o",
        dest="ssh_options",
        action="append",
        default=[],
        metavar="OPTION",
        help="an ssh option, e.g. -o ForwardAgent=yes (repeatable; before ID|USER)",
    )
    ssh.add_argument("session", metavar="ID|USER", help=ref)
    ssh.add_argument("command", nargs=argparse.REMAINDER, help="-- and a command to run")

    audit = command(sub, "audit", commands.audit, "audit events, oldest first")
    audit.add_argument("--user", help="only this user's events")
    audit.add_argument("--limit", type=_positive, default=50, help="events shown (default 50)")
    audit.add_argument("--follow", action="store_true", help="keep printing new events")
    audit.add_argument(
        "--interval", type=_seconds, default=2.0, help="seconds between polls with --follow"
    )

    gpus = command(sub, "gpus", commands.gpus, "GPUs, their slices, who holds them, what is free")
    gpus.add_argument(
        "--probe", action="store_true", help="read-only local NVML probe, printed as JSON"
    )
    command(sub, "nodes", commands.nodes, "machines sessions run on, their state and GPU slices")
    config = command(
        sub, "ssh-config", commands.ssh_config_block, "a Host block for ~/.ssh/config", json=False
    )
    config.add_argument("session", metavar="USER", help=ref)
