"""``make bench``: every benchmark in one run; prints the tables and writes them as JSON.

    .venv/bin/python -m bench [--quick] [--json bench-results.json] [--parts bulk,idle,live,swarm]

Read the ratios (same run, same machine), not the absolute numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
from pathlib import Path
from typing import Any

from bench import bulk, idle, live, swarm
from bench.tools import GiB, table


def machine() -> str:
    model = next(
        (line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
         if line.startswith("model name")),
        platform.processor(),
    )  # fmt: skip
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GiB
    return f"{os.cpu_count()} x {model}, {memory:.0f} GiB, Linux {platform.release()}"


def show(results: dict[str, Any]) -> str:
    parts = [f"machine: {results['machine']}"]
    if "bulk" in results:
        rows = [[name, f"{r['mb_per_s']:.0f}", f"{r['ratio_to_direct']:.2f}",
                 f"{r['cpu_s_per_gib']:.2f}"] for name, r in results["bulk"].items()]  # fmt: skip
        parts.append(table("1. bulk TCP, 1 source -> 1 sink over loopback",
                           ["path", "MB/s", "x direct", "CPU s/GiB (relay)"], rows))  # fmt: skip
    if "live" in results:
        ssh = results["live"]["ssh"]
        rows = [[name, f"{r['mb_per_s']:.0f}", f"{r.get('ratio_to_direct', 1.0):.2f}",
                 f"{r['gateway_cpu_s_per_gib']:.2f}"] for name, r in ssh.items()]  # fmt: skip
        parts.append(table("2. ssh (chacha20) bulk", ["path", "MB/s", "x direct",
                                                       "gateway CPU s/GiB"], rows))  # fmt: skip
        ready = results["live"]["create_to_ready"]
        rows = [[name, f"{r['p50_s']:.2f}", f"{r['p95_s']:.2f}"] for name, r in ready.items()]
        parts.append(table("3. start to ready", ["what", "p50 s", "p95 s"], rows))
        many = results["live"]["many_sessions"]
        parts.append(table("4. many live sessions", ["figure", "value"],
                           [[k, f"{v:.2f}" if isinstance(v, float) else str(v)]
                            for k, v in many.items()]))  # fmt: skip
    if "idle" in results:
        rows = [[name, str(r["connections"]), f"{r['relay_rss_mib']:.1f}",
                 f"{r['kib_per_connection']:.1f}", f"{r['kib_ratio_to_reference']:.2f}",
                 f"{r['fds_per_connection']:.1f}", f"{r['fds_ratio_to_reference']:.2f}"]
                for name, r in results["idle"].items()]  # fmt: skip
        parts.append(table("5. idle relayed connections", ["data path", "connections",
                           "relay RSS MiB", "KiB/connection", "x reference", "fds/connection",
                           "x reference"], rows))  # fmt: skip
    if "swarm" in results and "skipped" in results["swarm"]:
        parts.append(f"6. --runtime docker vs swarm: skipped ({results['swarm']['skipped']})")
    elif "swarm" in results:
        rows = [[name, f"{r['p50_s']:.2f}", f"{r['p95_s']:.2f}",
                 ", ".join(f"{k} {v:.2f}" for k, v in r["steps_p50_s"].items())]
                for name, r in results["swarm"].items()]  # fmt: skip
        head = ["runtime", "p50 s", "p95 s", "p50 s per create step"]
        parts.append(table("6. POST to ready, --runtime docker vs swarm", head, rows))
    return "\n\n".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke run")
    parser.add_argument("--json", type=Path, default=Path("bench-results.json"))
    parser.add_argument("--parts", default="bulk,idle,live,swarm")
    parser.add_argument("--image", default=os.environ.get("SANDMAN_IMAGE", "gpu-workspace:latest"))
    parser.add_argument("--sessions", type=int, default=200, help="live sessions to aim for")
    parser.add_argument("--budget", type=float, default=300.0,
                        help="seconds creating sessions may take (part 4)")  # fmt: skip
    args = parser.parse_args()
    parts = set(args.parts.split(","))
    size = (64 << 20) if args.quick else GiB
    results: dict[str, Any] = {"machine": machine()}
    if "bulk" in parts:
        results["bulk"] = bulk.run(size, 2 if args.quick else 3)
    if "idle" in parts:
        count = 100 if args.quick else 1000
        results["idle"] = {name: idle.run(count, name) for name in idle.RELAYS}
        anchor = results["idle"]["reference: minimal splice relay"]
        for r in results["idle"].values():
            r["kib_ratio_to_reference"] = r["kib_per_connection"] / anchor["kib_per_connection"]
            r["fds_ratio_to_reference"] = r["fds_per_connection"] / anchor["fds_per_connection"]
    if "live" in parts:
        with tempfile.TemporaryDirectory(prefix="sandman-bench-") as tmp:
            results["live"] = live.run(
                Path(tmp), args.image, ssh_size=size, rounds=1 if args.quick else 3,
                ready_count=2 if args.quick else 10,
                sessions=3 if args.quick else args.sessions, budget_s=args.budget,
            )  # fmt: skip
    if "swarm" in parts:
        with tempfile.TemporaryDirectory(prefix="sandman-bench-") as tmp:
            results["swarm"] = swarm.run(Path(tmp), args.image, 2 if args.quick else 10)
    print(show(results))
    args.json.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\n(also in {args.json})")


if __name__ == "__main__":
    main()
