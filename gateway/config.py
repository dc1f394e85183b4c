"""Gateway configuration: one frozen dataclass, built once from the command line and
``SANDMAN_<NAME>`` environment variables. Nothing else reads the environment."""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import socket
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gateway.core.idle import UNKNOWN_BUSY, UNKNOWN_IDLE, IdlePolicy
from gateway.core.ports import PortRange
from gateway.core.validation import LimitPolicy, parse_duration, parse_size

DEFAULT_IMAGE = "gpu-workspace"
DEFAULT_EXPIRY_WARNINGS = (600.0, 60.0)  # seconds before expiry
RUNTIMES = ("docker", "swarm")


@dataclass(frozen=True, slots=True)
class Config:
    host: str = "127.0.0.1"  # containers must not reach the API unless the operator says so
    port: int = 8080
    ssh_bind: str = "0.0.0.0"
    public_host: str = field(default_factory=socket.gethostname)
    ssh_host_aliases: tuple[str, ...] = ()
    state_dir: Path = Path("/var/lib/orchestrator")
    db: Path | None = None
    workspace_root: Path = Path("/srv/workspaces")
    ssh_ports: PortRange = field(default_factory=lambda: PortRange(10000, 20000))
    image: str = DEFAULT_IMAGE
    allowed_images: tuple[str, ...] = ()
    reap_interval: float = 60.0
    default_ttl_minutes: int = 60
    max_ttl_minutes: int = 1440
    api_token: str | None = None
    api_token_file: Path | None = None
    cors_origins: tuple[str, ...] = ()
    runtime: str = "docker"  # or "swarm": each session one Swarm service
    place_timeout: float = 10.0  # swarm: seconds a task may wait for a node (503 no_capacity)
    shared_workspaces: bool = False  # swarm: the workspace root is shared by every node
    docker_network: str = "worknet"
    network_egress: bool = True
    gpus: str = "auto"
    #: None: each MIG model's 3-compute-slice profile; "any": any free MIG instance
    default_mig_profile: str | None = None
    mig_dynamic: bool = False
    ssh_password_auth: bool = True
    ssh_agent_forwarding: bool = True  # the client must still ask (ssh -A)
    ssh_streamlocal_forwarding: bool = False
    tmux_attach: bool = False  # interactive logins land in a persistent tmux session
    start_timeout: float = 60.0
    pids_limit: int = 1024
    max_body_bytes: int = 64 * 1024
    http_timeout: float = 15.0
    log_level: str = "INFO"
    audit_log: Path | None = None
    audit_retention_days: float = 90.0
    expiry_warnings: tuple[float, ...] = DEFAULT_EXPIRY_WARNINGS
    idle_timeout: float | None = None
    preauth_timeout: float = 10.0
    max_connections_per_session: int = 32  # VS Code, terminals and a parallel rsync
    # Tests only, from SANDMAN_TEST_STOP_AT (no flag): a create that reaches this step (see
    # sessions.CREATE_STEPS) stops the process (SIGSTOP), so a test can SIGKILL it right there.
    test_stop_at: str | None = None
    limits: LimitPolicy = field(default_factory=LimitPolicy)
    idle_reclaim: bool = True
    idle: IdlePolicy = field(default_factory=IdlePolicy)
    idle_sample: float = 60.0
    # fair sharing (seconds; gpu_hours_per_week None: unlimited)
    fairshare_half_life: float = 7 * 86400.0
    queue_timeout: float = 2 * 3600.0
    max_queued_per_user: int = 1
    claim_timeout: float = 15 * 60.0
    gpu_hours_per_week: float | None = None

    @property
    def db_path(self) -> Path:
        return self.db if self.db is not None else self.state_dir / "sessions.db"

    @property
    def audit_log_path(self) -> Path:
        return self.audit_log if self.audit_log is not None else self.state_dir / "audit.log"

    @property
    def ssh_hosts(self) -> tuple[str, ...]:
        """Every name or address users may type for this host: the host certificate's
        principals and the known_hosts line's patterns."""
        return tuple(dict.fromkeys((self.public_host, *self.ssh_host_aliases)))

    @property
    def token_path(self) -> Path:
        return self.api_token_file or self.state_dir / "api-token"


def _valid_ssh_host(host: str) -> bool:
    """A name or address that fits a known_hosts pattern and a certificate principal."""
    return (
        bool(host)
        and len(host) <= 253
        and all(c.isascii() and (c.isalnum() or c in ".-:_") for c in host)
    )


def _env_name(option: str) -> str:
    return "SANDMAN_" + option.lstrip("-").replace("-", "_").upper()


class EnvError(Exception):
    """A ``SANDMAN_<NAME>`` variable holds a value its option cannot take. Not a
    ``ValueError``, so argparse lets it through instead of blaming the command line."""


class _FromEnv(str):
    """An option's default as its environment variable spells it; argparse converts it
    (only for the command being run) with the option's type, which knows where it came
    from."""

    def __new__(cls, value: str, name: str) -> _FromEnv:
        text = super().__new__(cls, value)
        text.name = name
        return text

    name: str


_KINDS = {int: "whole number", float: "number"}


def _typed(type_: Callable[[str], object]) -> Callable[[str], object]:
    """``type_`` as an argparse type: a bad value on the command line is argparse's usage
    error; one from the environment is an :class:`EnvError` naming the variable."""

    def convert(text: str) -> object:
        try:
            return type_(text)
        except (ValueError, argparse.ArgumentTypeError) as exc:
            if isinstance(text, _FromEnv):
                what = _KINDS.get(type_)  # type: ignore[call-overload]
                why = f"not a {what}" if what else str(exc)
                raise EnvError(f"{text.name}={str(text)!r}: {why}") from None
            raise

    convert.__name__ = getattr(type_, "__name__", "value")  # argparse's "invalid int value"
    return convert


def _flag_value(text: str) -> bool:
    """A flag's environment value: :func:`on_off`, or empty for off."""
    return bool(text.strip()) and on_off(text)


class _Flag(argparse.Action):
    """``store_true`` whose default may come from the environment (converted lazily)."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: object, option_string: str | None = None) -> None:  # fmt: skip
        setattr(namespace, self.dest, True)


class _Repeat(argparse._AppendAction):
    """``append`` where the command line replaces the environment's list, not extends it."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: object, option_string: str | None = None) -> None:  # fmt: skip
        if getattr(namespace, self.dest, None) is self.default:
            setattr(namespace, self.dest, [])
        super().__call__(parser, namespace, values, option_string)


def _version() -> str:
    try:
        return importlib.metadata.version("sandman")
    except importlib.metadata.PackageNotFoundError:  # run from a checkout, not installed
        return "(not installed)"


def on_off(text: str) -> bool:
    """``on``/``off`` (also ``yes``/``no``, ``true``/``false``, ``1``/``0``).

    Raises:
        argparse.ArgumentTypeError: anything else.
    """
    value = text.strip().lower()
    if value in {"on", "yes", "true", "1"}:
        return True
    if value in {"off", "no", "false", "0"}:
        return False
    raise argparse.ArgumentTypeError(f"expected on or off, not {text!r}")


def build_parser(
    env: Mapping[str, str],
    add_commands: Callable[[argparse._SubParsersAction], None] | None = None,
) -> argparse.ArgumentParser:
    """The ``sandman`` command line; each ``serve`` option defaults from ``SANDMAN_<NAME>``.
    ``add_commands`` adds further subcommands (the API client's)."""
    parser = argparse.ArgumentParser(
        prog="sandman",
        description="Sandman GPU SSH gateway. Every option can also be set as the "
        "environment variable SANDMAN_<OPTION> (dashes as underscores, upper case; "
        "repeatable options as a comma-separated list; flags as 1/true/yes/on or "
        "0/false/no/off); an option on the command line replaces its variable.",
    )
    parser.add_argument("--version", action="version", version=f"sandman {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the gateway (REST API and SSH relays)")
    d = Config()

    def opt(
        name: str,
        help_text: str,
        *,
        default: object,
        type_: Callable[[str], object] = str,
        shown: str = "",
    ) -> None:
        serve.add_argument(
            name,
            type=_typed(type_),
            default=_env_default(env, name, default),
            help=f"{help_text} (default: {shown or default}; env {_env_name(name)})",
        )

    def multi(name: str, help_text: str) -> None:
        raw = env.get(_env_name(name), "")
        value = [v.strip() for v in raw.split(",") if v.strip()]
        serve.add_argument(
            name,
            action=_Repeat,
            default=value,
            help=f"{help_text} (repeatable, replacing the environment's list; "
            f"env {_env_name(name)}, comma-separated)",
        )

    def flag(name: str, help_text: str) -> None:
        serve.add_argument(
            name,
            action=_Flag,
            type=_typed(_flag_value),
            default=_env_default(env, name, False),
            help=f"{help_text} (env {_env_name(name)}=1)",
        )

    opt("--host", "address the REST API binds", default=d.host)
    opt("--port", "REST API port", default=d.port, type_=int)
    opt("--ssh-bind", "address the session SSH listeners bind", default=d.ssh_bind)
    opt("--public-host", "host name returned to users as ssh_host", default=d.public_host)
    multi(
        "--ssh-host-alias",
        "another name or address users may type for this host (put in host certificates)",
    )
    opt(
        "--state-dir",
        "folder for the database and the generated API token",
        default=d.state_dir,
        type_=Path,
    )
    opt("--db", "SQLite database file", default=None, type_=Path, shown="<state-dir>/sessions.db")
    opt(
        "--workspace-root",
        "folder holding one workspace per user",
        default=d.workspace_root,
        type_=Path,
    )
    opt("--ssh-port-start", "first session SSH port", default=d.ssh_ports.start, type_=int)
    opt("--ssh-port-end", "last session SSH port", default=d.ssh_ports.end, type_=int)
    opt("--image", "default workspace image", default=d.image)
    multi("--allowed-image", "further image sessions may ask for")
    opt("--reap-interval", "seconds between TTL sweeps", default=d.reap_interval, type_=float)
    opt(
        "--default-ttl-minutes",
        "TTL of a session that asks for none",
        default=d.default_ttl_minutes,
        type_=int,
    )
    opt(
        "--max-ttl-minutes",
        "largest TTL a session may ask for",
        default=d.max_ttl_minutes,
        type_=int,
    )
    opt(
        "--api-token-file",
        "file holding the API bearer token (SANDMAN_API_TOKEN gives it directly)",
        default=None,
        type_=Path,
        shown="<state-dir>/api-token, generated on first start",
    )
    multi("--cors-origin", "origin allowed by CORS (default: any origin, echoed)")
    opt(
        "--runtime",
        "docker (containers on this engine) or swarm (one service per session on the Swarm "
        "this engine manages; docs/scale-out.md)",
        default=d.runtime,
    )
    opt(
        "--place-timeout",
        "with --runtime swarm, a create whose task no node takes within this long fails with "
        "503 no_capacity and the engine's reason",
        default="10s",
    )
    flag(
        "--shared-workspaces",
        "with --runtime swarm: the workspace root is the same shared storage (e.g. NFS) on "
        "every node, so sessions may run on any node (else on the gateway's node only)",
    )
    opt(
        "--docker-network", "Docker bridge network for session containers", default=d.docker_network
    )
    flag("--no-egress", "create the session network as internal: containers cannot reach outside")
    opt("--gpus", "GPU backend: auto, nvml, none or sim:<topology.json>", default=d.gpus)
    opt(
        "--default-mig-profile",
        "MIG profile given when a request names none; checked against the host's MIG GPUs "
        "at start; 'any' gives any free MIG instance",
        default=d.default_mig_profile,
        shown="each model's 3-slice profile (3g.20gb, 3g.40gb, 3g.71gb, ...)",
    )
    flag(
        "--tmux-attach",
        "interactive SSH logins land in the user's persistent tmux session (ssh host cmd, "
        "scp and sftp are untouched)",
    )
    flag("--mig-dynamic", "create MIG instances on demand and destroy them when the session ends")
    flag("--no-ssh-password-auth", "disable password login into session containers")
    opt(
        "--ssh-agent-forwarding",
        "on: sessions' sshd allows agent forwarding (clients still ask with ssh -A)",
        default="on" if d.ssh_agent_forwarding else "off",
        type_=on_off,
    )
    opt(
        "--ssh-streamlocal-forwarding",
        "on: sessions' sshd forwards Unix sockets (ssh -R/-L with socket paths, e.g. gpg-agent)",
        default="on" if d.ssh_streamlocal_forwarding else "off",
        type_=on_off,
    )
    opt(
        "--start-timeout",
        "seconds a container has to answer SSH before creation fails",
        default=d.start_timeout,
        type_=float,
    )
    opt("--pids-limit", "process limit of each session container", default=d.pids_limit, type_=int)
    opt("--max-body-bytes", "largest accepted request body", default=d.max_body_bytes, type_=int)
    opt(
        "--http-timeout",
        "close an API connection that has not sent a whole request head (slow-loris) or "
        "a whole body within this long, or sits idle this long",
        default="15s",
    )
    opt("--log-level", "DEBUG, INFO, WARNING or ERROR", default=d.log_level)
    opt(
        "--audit-log",
        "JSON-lines file of connection and session events",
        default=None,
        type_=Path,
        shown="<state-dir>/audit.log",
    )
    opt(
        "--audit-retention-days",
        "days audit records are kept",
        default=d.audit_retention_days,
        type_=float,
    )
    multi(
        "--expiry-warning",
        "warn the user's terminals this long before expiry, e.g. 10m, 60s (default: 10m and 1m)",
    )
    opt(
        "--idle-timeout",
        "close a connection after this long with no bytes either way; SSH keepalives "
        "count as traffic; 0 is off",
        default="0",
    )
    opt(
        "--preauth-timeout",
        "close a connection whose client sends no SSH identification line within this long",
        default="10s",
    )
    opt(
        "--max-connections-per-session",
        "connections one session holds; a newcomer makes one that has not finished its key "
        "exchange yield, else it is refused with an SSH disconnect message",
        default=d.max_connections_per_session,
        type_=int,
    )
    for kind, example in (("cpu", "CPUs, e.g. 2 or 0.5"), ("memory", "e.g. 8g or 512m")):
        opt(
            f"--{kind}-limit",
            f"{kind} limit of a session that asks for none ({example}); none: unlimited, "
            "or the maximum where one is set",
            default="none",
        )
        opt(
            f"--max-{kind}-limit",
            f"largest {kind} limit a session may ask for ({example}); none: no maximum",
            default="none",
        )
    _idle_options(opt)
    opt(
        "--fairshare-half-life",
        "GPU usage counts half as much in the waiting list's order after this long",
        default="7d",
    )
    opt(
        "--queue-timeout",
        "a request waiting this long for capacity ends (queue_timeout)",
        default="2h",
    )
    opt(
        "--max-queued-per-user",
        "requests one user may have waiting",
        default=d.max_queued_per_user,
        type_=int,
    )
    opt(
        "--claim-timeout",
        "a session started from the waiting list that sees no connection within this long "
        "ends (not_claimed)",
        default="15m",
    )
    opt(
        "--gpu-hours-per-week",
        "each user's GPU-hours in any 7 days (a 1g slice of 7 for an hour is 1/7); "
        "0: unlimited; PUT /users/{id}/limits sets one user's",
        default=0.0,
        type_=float,
    )
    if add_commands is not None:
        add_commands(sub)

    health = sub.add_parser(
        "health",
        help="exit 0 if the gateway answers /healthz with 200",
        description="GET /healthz of the gateway at --url, else at --host/--port (or "
        "SANDMAN_HOST/SANDMAN_PORT, as `serve` reads them), else at the client's URL "
        "(SANDMAN_URL or `sandman login`'s), else on this machine's port 8080.",
    )
    health.add_argument("--url", help="the gateway's URL, e.g. http://gpu01.lab:8080")
    health.add_argument(
        "--host",
        default=_env_default(env, "--host", None),
        help="address its API binds (a wildcard is reached on loopback; env SANDMAN_HOST)",
    )
    health.add_argument(
        "--port",
        type=_typed(int),
        default=_env_default(env, "--port", None),
        help=f"its API port (default: {d.port}; env SANDMAN_PORT)",
    )
    node = sub.add_parser(
        "node",
        help="this machine's GPU slices as Swarm node generic resources (daemon.json)",
        description="Read this machine's GPUs (NVML, or a simulated topology) and print the "
        "dockerd setting that offers each MIG device as MIG-<profile>=<uuid> and each whole "
        "GPU as NVIDIA-GPU=<uuid>; with --write, set it in that daemon.json (other settings "
        "kept; restart dockerd to apply). docs/scale-out.md",
    )
    node.add_argument("--gpus", default="nvml", help="nvml, or sim:<topology.json> (default nvml)")
    node.add_argument("--write", metavar="DAEMON_JSON", help="e.g. /etc/docker/daemon.json")
    return parser


def _idle_options(opt: Callable[..., None]) -> None:
    """The idle reclaim settings (docs/operators.md, "Idle reclaim")."""
    opt("--idle-reclaim", "end sessions nobody uses: on or off", default="on")
    opt(
        "--idle-no-connection",
        "idle needs no relayed connection for this long, e.g. 90s, 30m, 2h, 1d",
        default="30m",
    )
    opt("--idle-compute", "... and compute below its threshold for this long", default="60m")
    opt("--idle-gpu-threshold", "GPU utilisation (%%) below which a slice is idle", default="5")
    opt(
        "--idle-cpu-threshold",
        "CPU use (%% of one core) below which a GPU-less session is idle",
        default="10",
    )
    opt(
        "--idle-mig-unknown",
        "a MIG slice that reports no utilisation (Ampere) is: busy while compute processes "
        "run on it, or idle",
        default=UNKNOWN_BUSY,
    )
    opt("--idle-warn", "warn this long before an idle reclaim, comma-separated", default="30m,5m")
    opt("--idle-hold-max", "longest hold a user may put on a session", default="24h")
    opt("--idle-sample", "how often connections and compute are sampled", default="60s")


def _idle_policy(args: argparse.Namespace) -> tuple[bool, IdlePolicy, float]:
    """``--idle-reclaim``, the idle policy and ``--idle-sample``.

    Raises:
        ValueError: a malformed setting, a threshold outside 0-100 (GPU) or below 0 (CPU),
            or a zero sample period.
    """
    switch = args.idle_reclaim.strip().lower()
    if switch not in ("on", "off"):
        raise ValueError("--idle-reclaim must be on or off")
    if args.idle_mig_unknown not in (UNKNOWN_BUSY, UNKNOWN_IDLE):
        raise ValueError("--idle-mig-unknown must be busy or idle")
    gpu, cpu = float(args.idle_gpu_threshold), float(args.idle_cpu_threshold)
    if not 0 <= gpu <= 100 or cpu < 0:
        raise ValueError("--idle-gpu-threshold is 0-100 and --idle-cpu-threshold at least 0")
    sample = parse_duration(args.idle_sample)
    if sample <= 0:
        raise ValueError("--idle-sample must be positive")
    policy = IdlePolicy(
        no_connection=parse_duration(args.idle_no_connection),
        compute=parse_duration(args.idle_compute),
        gpu_threshold=gpu,
        cpu_threshold=cpu,
        mig_unknown=args.idle_mig_unknown,
        warnings=tuple(parse_duration(w) for w in args.idle_warn.split(",") if w.strip()),
        hold_max=parse_duration(args.idle_hold_max),
    )
    return switch == "on", policy, sample


def _env_default(env: Mapping[str, str], option: str, default: object) -> object:
    """The option's default: its environment variable's text, if set (argparse converts it
    only when the option's command runs), else ``default``."""
    name = _env_name(option)
    raw = env.get(name)
    return default if raw is None else _FromEnv(raw, name)


def _optional(text: str, parse: Callable[[str], float]) -> float | None:
    return None if text.strip().lower() in {"", "none"} else parse(text)


def _limit_policy(args: argparse.Namespace) -> LimitPolicy:
    """The operator's CPU and memory limits.

    Raises:
        ValueError: malformed, below the minimum, a default above its maximum, or more
            CPUs than this host has (Docker would refuse every session).
    """
    memory = [_optional(t, parse_size) for t in (args.memory_limit, args.max_memory_limit)]
    cpus = [_optional(t, float) for t in (args.cpu_limit, args.max_cpu_limit)]
    host_cpus = os.cpu_count() or 1
    if any(c is not None and c > host_cpus for c in cpus):
        raise ValueError(f"a CPU limit cannot be above this host's {host_cpus} CPUs")
    return LimitPolicy(
        default_cpus=cpus[0],
        max_cpus=cpus[1],
        default_memory=None if memory[0] is None else int(memory[0]),
        max_memory=None if memory[1] is None else int(memory[1]),
    )


def config_from_args(args: argparse.Namespace, env: Mapping[str, str]) -> Config:
    """Build and check the :class:`Config` of ``sandman serve``.

    Raises:
        ValueError: an option is out of range.
    """
    if args.max_ttl_minutes < 1:
        raise ValueError("--max-ttl-minutes must be at least 1")
    if not 1 <= args.default_ttl_minutes <= args.max_ttl_minutes:
        raise ValueError("--default-ttl-minutes must be between 1 and --max-ttl-minutes")
    if args.reap_interval <= 0 or args.start_timeout <= 0:
        raise ValueError("--reap-interval and --start-timeout must be positive")
    hosts = [args.public_host, *args.ssh_host_alias]
    bad = [h for h in hosts if not _valid_ssh_host(h)]
    if bad:
        raise ValueError(f"not a host name or address: {', '.join(map(repr, bad))}")
    if args.max_connections_per_session < 1:
        raise ValueError("--max-connections-per-session must be at least 1")
    warnings = tuple(parse_duration(w) for w in args.expiry_warning) or DEFAULT_EXPIRY_WARNINGS
    idle = parse_duration(args.idle_timeout)
    preauth = parse_duration(args.preauth_timeout)
    if preauth <= 0:
        raise ValueError("--preauth-timeout must be positive")
    if args.runtime not in RUNTIMES:
        raise ValueError(f"--runtime must be one of {', '.join(RUNTIMES)}, not {args.runtime!r}")
    if args.runtime == "swarm" and args.no_egress:
        raise ValueError("--no-egress does not work with --runtime swarm yet (docs/scale-out.md)")
    if args.shared_workspaces and args.runtime != "swarm":
        raise ValueError("--shared-workspaces needs --runtime swarm")
    place_timeout = parse_duration(args.place_timeout)
    if place_timeout <= 0:
        raise ValueError("--place-timeout must be positive")
    http_timeout = parse_duration(args.http_timeout)
    if http_timeout <= 0:
        raise ValueError("--http-timeout must be positive")
    idle_reclaim, idle_policy, idle_sample = _idle_policy(args)
    fair = {
        name: parse_duration(getattr(args, name))
        for name in ("fairshare_half_life", "queue_timeout", "claim_timeout")
    }
    if min(fair.values()) <= 0:
        raise ValueError(
            "--fairshare-half-life, --queue-timeout and --claim-timeout must be positive"
        )
    if args.max_queued_per_user < 0 or args.gpu_hours_per_week < 0:
        raise ValueError("--max-queued-per-user and --gpu-hours-per-week cannot be negative")
    return Config(
        host=args.host,
        port=args.port,
        ssh_bind=args.ssh_bind,
        public_host=args.public_host,
        ssh_host_aliases=tuple(args.ssh_host_alias),
        state_dir=args.state_dir,
        db=args.db,
        workspace_root=args.workspace_root,
        ssh_ports=PortRange(args.ssh_port_start, args.ssh_port_end),
        image=args.image,
        allowed_images=tuple(dict.fromkeys(args.allowed_image)),
        reap_interval=args.reap_interval,
        default_ttl_minutes=args.default_ttl_minutes,
        max_ttl_minutes=args.max_ttl_minutes,
        api_token=env.get("SANDMAN_API_TOKEN") or None,
        api_token_file=args.api_token_file,
        cors_origins=tuple(args.cors_origin),
        runtime=args.runtime,
        place_timeout=place_timeout,
        shared_workspaces=args.shared_workspaces,
        docker_network=args.docker_network,
        network_egress=not args.no_egress,
        gpus=args.gpus,
        default_mig_profile=args.default_mig_profile,
        mig_dynamic=args.mig_dynamic,
        ssh_password_auth=not args.no_ssh_password_auth,
        ssh_agent_forwarding=args.ssh_agent_forwarding,
        ssh_streamlocal_forwarding=args.ssh_streamlocal_forwarding,
        tmux_attach=args.tmux_attach,
        start_timeout=args.start_timeout,
        pids_limit=args.pids_limit,
        max_body_bytes=args.max_body_bytes,
        http_timeout=http_timeout,
        log_level=args.log_level.upper(),
        audit_log=args.audit_log,
        audit_retention_days=args.audit_retention_days,
        expiry_warnings=warnings,
        idle_timeout=idle or None,
        preauth_timeout=preauth,
        max_connections_per_session=args.max_connections_per_session,
        test_stop_at=env.get("SANDMAN_TEST_STOP_AT") or None,
        limits=_limit_policy(args),
        idle_reclaim=idle_reclaim,
        idle=idle_policy,
        idle_sample=idle_sample,
        max_queued_per_user=args.max_queued_per_user,
        gpu_hours_per_week=args.gpu_hours_per_week or None,
        **fair,
    )


def parse(
    argv: Sequence[str] | None = None,
    env: Mapping[str, str] | None = None,
    add_commands: Callable[[argparse._SubParsersAction], None] | None = None,
) -> argparse.Namespace:
    return build_parser(os.environ if env is None else env, add_commands).parse_args(argv)
