"""The process's file-descriptor budget: raised to what the system allows, and what it holds.

A relayed connection holds two sockets while idle and two pipe ends more only while bytes
are in flight (:mod:`gateway.relay.splice`); listeners, the database, the Docker client
and the API hold a few more. Service managers start processes with a soft limit of 1024
(systemd's default, and Docker's for containers on many hosts) though the hard limit
allows far more, so the gateway raises the soft limit to the hard one at start, as
nginx and sshd's users do with ``LimitNOFILE=``.
"""

from __future__ import annotations

import logging
import resource
from dataclasses import dataclass

log = logging.getLogger(__name__)

FDS_PER_CONNECTION = 2  # an idle relayed connection: client and upstream sockets
FDS_PER_BUSY_CONNECTION = 6  # both directions mid-transfer: a pipe (two ends) each
RESERVED = 64  # database, Docker client, API sockets, log files, the pipe pool


@dataclass(frozen=True, slots=True)
class FdBudget:
    soft: int
    hard: int
    raised_from: int | None  # the soft limit before, if it was raised

    @property
    def idle_connections(self) -> int:
        """Relayed connections the limit holds when they are idle (most are)."""
        return max(0, self.soft - RESERVED) // FDS_PER_CONNECTION

    @property
    def busy_connections(self) -> int:
        """Relayed connections the limit holds when all move bytes at once."""
        return max(0, self.soft - RESERVED) // FDS_PER_BUSY_CONNECTION


def raise_fd_limit() -> FdBudget:
    """Raise the soft ``RLIMIT_NOFILE`` to the hard limit (best effort) and log the
    capacity it gives."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    raised_from = None
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else 1 << 20
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            raised_from, soft = soft, target
        except (ValueError, OSError) as exc:
            log.warning("could not raise the open-files limit from %d to %d: %s", soft, hard, exc)
    budget = FdBudget(soft, hard, raised_from)
    log.info(
        "open-files limit %d%s: room for about %d idle relayed connections (%d all busy)",
        budget.soft,
        f" (raised from {raised_from})" if raised_from is not None else "",
        budget.idle_connections,
        budget.busy_connections,
    )
    return budget
