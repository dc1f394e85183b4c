"""The client commands: each calls the API, prints for people (or ``--json``), returns an exit
status."""

from __future__ import annotations

import argparse
import asyncio
import json
import shlex
import subprocess
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

from gateway.client import format as fmt
from gateway.client.http import Api, ApiError
from gateway.client.keys import remember_session_key, ssh_argv, ssh_config, unseen_key_note
from gateway.client.settings import Settings, config_path, save

AUDIT_FOLLOW_PAGE = 1000
_AUDIT_DETAIL_KEYS = ("client_addr", "client_port", "reason", "expires_at", "gpu_uuid")


@dataclass(frozen=True, slots=True)
class Io:
    out: TextIO
    err: TextIO
    env: Mapping[str, str]
    inp: TextIO | None = None  # where answers to questions come from (None: no one answers)


Command = Callable[[Api, argparse.Namespace, Io], Awaitable[int]]


def _now() -> datetime:
    return datetime.now(UTC)


def _slice(session: Mapping[str, Any]) -> str:
    return session.get("mig_profile") or session.get("gpu_uuid") or "-"


def _read_public_keys(files: list[Path]) -> list[str]:
    """Every key line of the given files (``#`` comments and blank lines skipped).

    Raises:
        ApiError: a file cannot be read, or holds a private key, which is never sent
            (code ``invalid_public_key``).
    """
    lines: list[str] = []
    for path in files:
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ApiError(f"cannot read {path}: {exc}", "invalid_public_key") from None
        if "PRIVATE KEY" in text:
            raise ApiError(
                f"{path} is a private key: give its .pub file (nothing was sent)",
                "invalid_public_key",
            )
        lines += [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
    return lines


async def session_create(api: Api, args: argparse.Namespace, io: Io) -> int:
    body: dict[str, Any] = {"user_id": args.user}
    for name, value in (
        ("ttl_minutes", args.ttl),
        ("mig_profile", args.profile),
        ("mig_instance_uuid", args.mig_uuid),
        ("image", args.image),
        ("cpu_limit", args.cpus),
        ("memory_limit", args.memory),
    ):
        if value is not None:
            body[name] = value
    if args.public_key:
        body["ssh_public_keys"] = _read_public_keys(args.public_key)
    if args.no_idle_reclaim:
        body["idle_reclaim"] = False
    if args.follow and not args.wait:
        raise ApiError("--follow needs --wait", "invalid_request")
    if args.wait:
        body["wait"] = True
    created = await api.call("POST", "/sessions", json=body)
    key_file = remember_session_key(io.env, created)
    if args.json:
        shown = {**created, "ssh_private_key": None}
        fmt.dump(io.out, {**shown, "ssh_private_key_file": key_file and str(key_file)})
        return 0
    if created.get("state") == "queued":
        _print_queued(created, key_file, io)
        if not args.follow:
            return 0
        created = await _follow(api, created, args.interval, io)
    io.out.write(f"Session {created['session_id']} for {created['ssh_user']} is ready.\n")
    pairs: list[tuple[str, object]] = [
        ("ssh", shlex.join(ssh_argv(io.env, created, api.url))),
        (
            "expires",
            f"{fmt.local_time(created['expires_at'])} "
            f"(in {fmt.expires_in(created['expires_at'], _now())})",
        ),
        ("gpu", _slice(created)),
    ]
    if key_file is not None:
        pairs.append(("private key", f"{key_file} (0600)"))
    if created.get("ssh_host_key_fingerprint"):
        pairs.append(("host key", created["ssh_host_key_fingerprint"]))
    if created.get("ssh_password"):
        pairs.append(("password", f"{created['ssh_password']} (shown this once)"))
    fmt.fields(io.out, pairs)
    return 0


def _print_queued(queued: Mapping[str, Any], key_file: Path | None, io: Io) -> None:
    io.out.write(
        f"No GPU is free: request {queued['session_id']} for {queued['ssh_user']} is queued"
        f" at position {queued['queue_position']}.\n"
    )
    pairs: list[tuple[str, object]] = [
        ("gives up", fmt.local_time(queued["queue_expires_at"])),
        ("check", f"sandman session show {queued['session_id']}"),
    ]
    if key_file is not None:
        pairs.append(("private key", f"{key_file} (0600; works once it starts)"))
    if queued.get("ssh_password"):
        pairs.append(("password", f"{queued['ssh_password']} (shown this once)"))
    fmt.fields(io.out, pairs)


async def _follow(api: Api, queued: Mapping[str, Any], interval: float, io: Io) -> dict[str, Any]:
    """Wait until the queued request runs; its view, with the 202's credentials.

    Raises:
        ApiError: it ended while waiting (timed out, withdrawn, or its start failed).
    """
    session_id = queued["session_id"]
    position = queued["queue_position"]
    while True:
        await asyncio.sleep(interval)
        try:
            view = await api.call("GET", f"/sessions/{session_id}")
        except ApiError as exc:
            if exc.code == "session_not_found":
                raise ApiError(
                    f"request {session_id} is no longer waiting"
                    " (timed out, withdrawn, or its starts failed)",
                    "session_not_found",
                ) from None
            raise
        if view["state"] == "running":
            return {**queued, **view, "session_id": session_id, "ssh_user": view["user_id"]}
        if view["state"] == "queued" and view["queue_position"] != position:
            position = view["queue_position"]
            io.out.write(f"now at position {position}\n")


async def session_list(api: Api, args: argparse.Namespace, io: Io) -> int:
    sessions = await api.sessions()
    if args.json:
        fmt.dump(io.out, sessions)
        return 0
    now = _now()
    fmt.table(
        io.out,
        ["ID", "USER", "PORT", "GPU/PROFILE", "STATE", "EXPIRES IN", "CONNECTIONS"],
        [
            [
                s["id"],
                s["user_id"],
                s["ssh_port"],
                _slice(s),
                s.get("state", "-"),
                fmt.expires_in(s["expires_at"], now),
                s["active_connections"],
            ]
            for s in sessions
        ],
    )
    return 0


def _show(api: Api, session: Mapping[str, Any], io: Io) -> None:
    fmt.fields(
        io.out,
        [
            ("id", session["id"]),
            ("user", session["user_id"]),
            ("state", session.get("state", "-")),
            ("ssh", shlex.join(ssh_argv(io.env, session, api.url))),
            ("gpu", session.get("gpu_uuid") or "-"),
            ("profile", session.get("mig_profile") or "-"),
            ("image", session.get("metadata", {}).get("image", "-")),
            ("created", fmt.local_time(session["created_at"])),
            (
                "expires",
                f"{fmt.local_time(session['expires_at'])} "
                f"(in {fmt.expires_in(session['expires_at'], _now())})",
            ),
            ("connections", session["active_connections"]),
            ("idle", _idle(session.get("idle"))),
            ("limits", _limits(session)),
            ("host key", session.get("ssh_host_key_fingerprint") or "-"),
        ],
    )


def _idle(idle: Mapping[str, Any] | None) -> str:
    """Idle reclaim in a few words: what keeps the session, or when it ends."""
    if idle is None:
        return "never reclaimed (idle reclaim is off)"
    kept = ", ".join(idle["kept_because"])
    if kept:
        return f"kept: {kept}" + (
            f" (hold until {fmt.local_time(idle['hold_until'])})" if idle["hold_until"] else ""
        )
    return f"idle; reclaimed at {fmt.local_time(idle['reclaim_at'])} unless used"


def _limits(session: Mapping[str, Any]) -> str:
    cpus, memory = session.get("cpu_limit"), session.get("memory_limit")
    return (
        f"{'unlimited' if cpus is None else f'{cpus:g}'} CPUs, "
        f"{'unlimited' if memory is None else fmt.size(memory)} memory"
    )


async def session_show(api: Api, args: argparse.Namespace, io: Io) -> int:
    """A live session by id or user, or a waiting request by its id."""
    try:
        session = await api.find_session(args.session)
    except ApiError as exc:
        if exc.code != "session_not_found" or "/" in args.session:
            raise
        session = await api.call("GET", f"/sessions/{args.session}")  # waiting, by id
    if args.json:
        fmt.dump(io.out, session)
    elif session["state"] == "queued":
        fmt.fields(
            io.out,
            [
                ("id", session["id"]),
                ("user", session["user_id"]),
                ("state", f"queued at position {session['queue_position']}"),
                ("since", fmt.local_time(session["submitted_at"])),
                ("gives up", fmt.local_time(session["queue_expires_at"])),
                ("profile", session.get("mig_profile") or "default"),
            ],
        )
    else:
        _show(api, session, io)
    return 0


async def session_extend(api: Api, args: argparse.Namespace, io: Io) -> int:
    def said(updated: dict) -> str:
        return (
            f" now expires at {fmt.local_time(updated['expires_at'])} "
            f"(in {fmt.expires_in(updated['expires_at'], _now())})"
        )

    return await _patch(api, args, io, {"extend_minutes": args.minutes}, said)


async def session_hold(api: Api, args: argparse.Namespace, io: Io) -> int:
    return await _patch(
        api, args, io, {"idle_hold_minutes": args.minutes}, lambda u: f": {_idle(u['idle'])}"
    )


async def _patch(
    api: Api, args: argparse.Namespace, io: Io, body: dict, said: Callable[[dict], str]
) -> int:
    """PATCH the session ``args.session`` names with ``body``; print the answer (``--json``)
    or one line: ``Session ID of USER`` and what ``said`` makes of the answer."""
    session = await api.find_session(args.session)
    updated = await api.call("PATCH", f"/sessions/{session['id']}", json=body)
    if args.json:
        fmt.dump(io.out, updated)
    else:
        io.out.write(f"Session {updated['id']} of {updated['user_id']}{said(updated)}.\n")
    return 0


def _confirmed(io: Io, question: str) -> bool:
    """Ask ``question`` on stderr (stdout stays for ``--json``); only ``y``/``yes`` agrees,
    and no answer (no terminal, end of input) is no."""
    io.err.write(f"{question} [y/N] ")
    io.err.flush()
    answer = io.inp.readline() if io.inp is not None else ""
    if not answer.endswith("\n"):
        io.err.write("\n")
    return answer.strip().lower() in {"y", "yes"}


async def session_delete(api: Api, args: argparse.Namespace, io: Io) -> int:
    if args.all:
        if not args.yes:
            users = [s["user_id"] for s in await api.sessions()]
            question = (
                f"End all {len(users)} sessions ({', '.join(users)})? Their connections are "
                "cut and containers removed; workspaces stay."
            )
            if users and not await asyncio.to_thread(_confirmed, io, question):
                io.err.write("sandman: nothing deleted (--yes deletes without asking)\n")
                return 1
        answer = await api.call("DELETE", "/sessions")
    else:
        session = await api.find_session(args.session)
        answer = await api.call("DELETE", f"/sessions/{session['id']}")
    if args.json:
        fmt.dump(io.out, answer)
    else:
        io.out.write(answer["message"] + "\n")
    return 0


async def session_connections(api: Api, args: argparse.Namespace, io: Io) -> int:
    try:
        session_id = (await api.find_session(args.session))["id"]
    except ApiError as exc:
        if exc.code != "session_not_found":
            raise
        session_id = args.session  # an ended session's records are kept, under its id
    answer = await api.call("GET", f"/sessions/{session_id}/connections")
    if args.json:
        fmt.dump(io.out, answer)
        return 0
    fmt.table(
        io.out,
        ["STARTED", "DURATION", "CLIENT", "CLIENT BANNER", "UP", "DOWN", "CLOSED BY", "REASON"],
        [
            [
                fmt.local_time(c["started_at"]),
                "live" if c["ended_at"] is None else fmt.span(c["duration_seconds"] or 0),
                f"{c['client_addr']}:{c['client_port']}",
                c["client_banner"],
                fmt.size(c["bytes_client_to_container"]),
                fmt.size(c["bytes_container_to_client"]),
                c["closed_by"],
                c["reason"],
            ]
            for c in answer["connections"]
        ],
    )
    return 0


async def session_ssh(api: Api, args: argparse.Namespace, io: Io) -> int:
    session = await api.find_session(args.session)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    argv = ssh_argv(io.env, session, api.url, command, options=args.ssh_options)
    note = unseen_key_note(io.env, session)
    if note is not None:
        io.err.write(f"sandman: {note}\n")
        io.err.flush()
    return await asyncio.to_thread(_run, argv, io.env)


def _run(argv: list[str], env: Mapping[str, str]) -> int:
    try:
        return subprocess.run(argv, env=dict(env), check=False).returncode
    except FileNotFoundError:
        raise ApiError("ssh is not installed (Debian: apt-get install openssh-client)") from None


async def ssh_config_block(api: Api, args: argparse.Namespace, io: Io) -> int:
    io.out.write(ssh_config(io.env, await api.find_session(args.session), api.url))
    return 0


def _audit_rows(events: list[dict[str, Any]]) -> list[list[object]]:
    return [
        [
            fmt.local_time(e["at"]),
            e["event"],
            e.get("user_id"),
            e.get("session_id"),
            " ".join(f"{k}={e[k]}" for k in _AUDIT_DETAIL_KEYS if e.get(k) is not None),
        ]
        for e in events
    ]


async def audit(api: Api, args: argparse.Namespace, io: Io) -> int:
    params = {"limit": str(args.limit)}
    if args.user:
        params["user_id"] = args.user
    events = (await api.call("GET", "/audit", params=params))["events"]
    headers = ["TIME", "EVENT", "USER", "SESSION", "DETAIL"]
    if args.json and not args.follow:
        fmt.dump(io.out, events)
        return 0
    _audit_print(io, headers, list(reversed(events)), json_lines=args.json)
    last = events[0] if events else None
    while args.follow:
        await asyncio.sleep(args.interval)
        if last is not None:
            params = {**params, "since": last["at"], "limit": str(AUDIT_FOLLOW_PAGE)}
        page = (await api.call("GET", "/audit", params=params))["events"]
        new = [e for e in reversed(page) if last is None or e["id"] > last["id"]]
        if new:
            _audit_print(io, headers, new, json_lines=args.json, header=False)
            last = new[-1]
    return 0


def _audit_print(
    io: Io,
    headers: list[str],
    events: list[dict[str, Any]],
    *,
    json_lines: bool,
    header: bool = True,
) -> None:
    """Events oldest first, as a log reads: a table, or one JSON object per line."""
    if json_lines:
        for event in events:
            io.out.write(json.dumps(event) + "\n")
    elif header:
        fmt.table(io.out, headers, _audit_rows(events))
    else:
        for row in _audit_rows(events):
            io.out.write("  ".join(fmt.safe(c) for c in row) + "\n")
    io.out.flush()


async def gpus(api: Api, args: argparse.Namespace, io: Io) -> int:
    inventory = await api.call("GET", "/gpus")
    available = await api.call("GET", "/gpus/available")
    holders = {s["gpu_uuid"]: s["user_id"] for s in await api.sessions() if s.get("gpu_uuid")}
    swarm = _swarm_nodes((await api.call("GET", "/nodes"))["nodes"])
    if args.json:
        extra = {"nodes": swarm} if swarm else {}
        fmt.dump(
            io.out,
            {**inventory, "available_instances": available["available_instances"], **extra},
        )
        return 0
    if inventory["gpus"]:
        _gpu_table(io, inventory, available, holders)
    else:
        io.out.write("this host has no GPUs: sessions get none\n")
    if swarm:  # the gateway's NVML sees only its own host: the slices of every node
        io.out.write("\n")
        _node_table(io, swarm)
    return 0


def _swarm_nodes(nodes: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The Swarm's nodes; none for plain Docker, whose one node is this host."""
    return nodes if any(node["role"] != "standalone" for node in nodes) else []


def _gpu_table(
    io: Io, inventory: dict[str, Any], available: dict[str, Any], holders: dict[str, str]
) -> None:
    rows: list[list[object]] = []
    for gpu in inventory["gpus"]:
        if not gpu["mig_enabled"]:
            rows.append(
                [
                    gpu["index"],
                    gpu["name"],
                    "whole GPU",
                    gpu["uuid"],
                    holders.get(gpu["uuid"], "free"),
                ]
            )
        for mig in gpu["mig_instances"]:
            idle = "to destroy" if mig.get("to_destroy") else "free"  # a host process holds it
            rows.append(
                [
                    gpu["index"],
                    gpu["name"],
                    mig["profile"],
                    mig["uuid"],
                    holders.get(mig["uuid"], idle),
                ]
            )
        if gpu["mig_enabled"] and not gpu["mig_instances"]:
            rows.append([gpu["index"], gpu["name"], "MIG, no instances", gpu["uuid"], "-"])
    fmt.table(io.out, ["GPU", "NAME", "SLICE", "UUID", "HELD BY"], rows)
    counts: dict[str, int] = {}
    for item in available["available_instances"]:
        counts[item["profile"]] = counts.get(item["profile"], 0) + 1
    free = ", ".join(f"{n} x {p}" for p, n in sorted(counts.items())) or "none"
    io.out.write(f"\nfree: {free}\n")


async def nodes(api: Api, args: argparse.Namespace, io: Io) -> int:
    listed = await api.call("GET", "/nodes")
    if args.json:
        fmt.dump(io.out, listed)
    else:
        _node_table(io, listed["nodes"])
    return 0


def _node_table(io: Io, nodes: list[dict[str, Any]]) -> None:
    rows = [
        [
            node["hostname"] + (" (gateway)" if node["gateway"] else ""),
            node["role"],
            node["state"],
            node["availability"],
            node["address"] or "-",
            ", ".join(f"{r['kind']}={r['value']}" for r in node["resources"]) or "-",
        ]
        for node in nodes
    ]
    fmt.table(io.out, ["NODE", "ROLE", "STATE", "AVAILABILITY", "ADDRESS", "SLICES"], rows)


async def login(args: argparse.Namespace, io: Io) -> int:
    """Check the URL and token against the gateway, then save them to the config file."""
    try:
        token = args.token_file.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ApiError(f"cannot read the token file: {exc}") from None
    if not token:
        raise ApiError(f"the token file {args.token_file} is empty")
    settings = Settings(url=args.url.rstrip("/"), token=token)
    async with Api(settings) as api:
        await api.sessions()
    path = config_path(io.env)
    save(path, settings)
    io.out.write(f"Logged in to {settings.url}; saved to {path}\n")
    return 0
