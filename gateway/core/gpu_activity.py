"""A session's GPU activity as ``nvidia-smi`` reports it from inside the session, parsed
strictly into an idle :class:`~gateway.core.idle.Reading`.

On ``--runtime swarm`` a GPU session may run on a node whose NVML the gateway cannot see; the
control channel's ``{"read": "gpu"}`` answers with two ``nvidia-smi`` runs made in the task,
each ``{"exit_code": <int>, "output": <text>}``:

- ``--query-compute-apps=pid,used_memory --format=csv,noheader``: one ``<pid>, <N> MiB`` line
  per compute process on the devices the container sees (MIG devices too); nothing, or ``No
  running processes found``, when none runs.
- ``--query-gpu=utilization.gpu --format=csv,noheader,nounits``: a whole GPU's utilisation in
  percent; a MIG device reports ``[N/A]`` or ``[Not Supported]`` (unknown).

What counts is :func:`gateway.core.idle.is_busy`'s rule, as for the gateway's own NVML: a known
utilisation is judged by the threshold, an unknown one by whether compute processes run. An
answer that cannot be read (``nvidia-smi`` missing, failing, hanging, or printing something
else) is no reading at all, which is busy: unknown is not idle.
"""

from __future__ import annotations

import re

from gateway.core.idle import Reading

NO_PROCESSES = "No running processes found"
_APP = re.compile(r"^\d+, (?:\d+ MiB|\[N/A\]|\[Not Supported\]|\[Insufficient Permissions\])$")
_PERCENT = re.compile(r"^\d{1,3}$")


def command_run(found: object) -> tuple[int, str] | None:
    """A ``sandman-control`` report of one command, ``{"exit_code": <int>, "output": <text>}``,
    as (exit code, output); None if ``found`` is not exactly that."""
    if not isinstance(found, dict) or set(found) != {"exit_code", "output"}:
        return None
    exit_code, output = found["exit_code"], found["output"]
    if type(exit_code) is not int or not isinstance(output, str):
        return None
    return exit_code, output


def compute_processes(exit_code: int, output: str) -> bool | None:
    """Whether compute processes run on the devices (``--query-compute-apps``); None when
    the run failed or printed something else."""
    if exit_code != 0:
        return None
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    if not lines or lines == [NO_PROCESSES]:
        return False
    return True if all(_APP.match(line) for line in lines) else None


def utilization(exit_code: int, output: str) -> float | None:
    """The highest utilisation of the devices (``--query-gpu=utilization.gpu``), in percent;
    None when any device reports none (a MIG device), or the run failed or printed
    something else."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    if exit_code != 0 or not lines or not all(_PERCENT.match(line) for line in lines):
        return None
    percents = [float(line) for line in lines]
    return max(percents) if all(p <= 100 for p in percents) else None


def reading(apps: tuple[int, str], usage: tuple[int, str]) -> Reading | None:
    """The idle reading of the two runs; None (busy) when the processes cannot be read."""
    processes = compute_processes(*apps)
    if processes is None:
        return None
    return Reading(utilization(*usage), processes=processes)
