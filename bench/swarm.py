"""Part 6: POST /sessions to ready with ``--runtime swarm`` against plain Docker, on this
machine's engine (which must be a Swarm manager: ``docker swarm init``), alternating, and
where a Swarm create spends its time (the gateway's create steps, from its DEBUG log)."""

from __future__ import annotations

import itertools
import re
import subprocess
from datetime import datetime
from pathlib import Path
from typing import Any

from bench.live import Gateway
from bench.tools import percentile

STEP = re.compile(r"^(\S+ \S+) DEBUG gateway\.sessions: session (\S+): create step (\w+) done")


def step_seconds(log: Path) -> dict[str, list[float]]:
    """Seconds from each create step to the next, per step, from a gateway's DEBUG log."""
    by_session: dict[str, list[tuple[str, datetime]]] = {}
    for line in log.read_text().splitlines():
        if found := STEP.match(line):
            at = datetime.strptime(found[1], "%Y-%m-%d %H:%M:%S,%f")
            by_session.setdefault(found[2], []).append((found[3], at))
    spent: dict[str, list[float]] = {}
    for steps in by_session.values():
        for (_, before), (step, after) in itertools.pairwise(steps):
            spent.setdefault(step, []).append((after - before).total_seconds())
    return spent


def run(root: Path, image: str, count: int) -> dict[str, Any]:
    state = subprocess.run(["docker", "info", "--format", "{{.Swarm.LocalNodeState}}"],
                           capture_output=True, text=True).stdout.strip()  # fmt: skip
    if state != "active":
        return {"skipped": "this engine is not a Swarm manager: docker swarm init"}
    debug = ("--log-level", "DEBUG")
    gateways = {
        "docker": Gateway(root / "docker", image, extra=debug),
        "swarm": Gateway(root / "swarm", image, extra=("--runtime", "swarm", *debug)),
    }
    times: dict[str, list[float]] = {name: [] for name in gateways}
    try:
        for name, gw in gateways.items():
            (root / name).mkdir(parents=True)
            gw.start()
        for number in range(count):
            for name, gw in gateways.items():
                seconds, session = gw.create(f"{name}{number}")
                times[name].append(seconds)
                gw.delete(session)
    finally:
        for gw in gateways.values():
            gw.cleanup()
    out: dict[str, Any] = {
        name: {"p50_s": percentile(v, 0.5), "p95_s": percentile(v, 0.95)}
        for name, v in times.items()
    }
    out["swarm"]["p50_ratio_to_docker"] = out["swarm"]["p50_s"] / out["docker"]["p50_s"]
    for name, gw in gateways.items():
        steps = step_seconds(gw.root / "gateway.log")
        out[name]["steps_p50_s"] = {step: percentile(v, 0.5) for step, v in steps.items()}
    return out
