"""The open-files limit is raised to the hard limit at start, and its capacity logged."""

from __future__ import annotations

import resource
import subprocess
import sys


def test_the_soft_limit_is_raised_to_the_hard_one():
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)

    def low_soft_limit() -> None:  # as a service manager starts the gateway
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))

    code = (
        "import logging, resource; logging.basicConfig(level='INFO');"
        "from gateway.fdlimit import raise_fd_limit; budget = raise_fd_limit();"
        "print(resource.getrlimit(resource.RLIMIT_NOFILE)[0], budget.raised_from)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        preexec_fn=low_soft_limit,
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    soft, raised_from = done.stdout.split()
    expected = hard if hard != resource.RLIM_INFINITY else 1 << 20
    assert (int(soft), raised_from) == (expected, "256")
    assert "open-files limit" in done.stderr and "(raised from 256)" in done.stderr
    assert "idle relayed connections" in done.stderr
