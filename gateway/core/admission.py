"""Who gets a session's last connection slot (pure: state in, decision out).

A session holds at most ``limit`` relayed connections. When a newcomer finds them all
taken, a connection whose client has not finished its key exchange yields, as sshd's
``MaxStartups`` drops unauthenticated connections: so a few silent sockets (a squatter
who sent an identification line and stopped) can never lock the user out. The one to
go is taken from the source address holding the most such connections (a per-source
cap where sources differ), and within it the one silent the longest. Connections that
finished their key exchange are real logins and never yield: then the newcomer is
refused, with a message the client prints.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Hashable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Slot:
    """One live connection as admission sees it."""

    key: Hashable
    source: str  # the client's address
    silent_since: float  # when its client last sent a byte (monotonic seconds)
    kex_done: bool


@dataclass(frozen=True, slots=True)
class Admission:
    """``admit``; ``evict`` names the slot to cut first (None: a slot is free)."""

    admit: bool
    evict: Hashable | None = None


def admit(live: Sequence[Slot], limit: int) -> Admission:
    """Decide for a newcomer given the session's ``live`` connections."""
    if len(live) < limit:
        return Admission(admit=True)
    waiting = [slot for slot in live if not slot.kex_done]
    if not waiting:
        return Admission(admit=False)
    per_source = Counter(slot.source for slot in waiting)
    most = max(per_source.values())
    crowded = [slot for slot in waiting if per_source[slot.source] == most]
    victim = min(crowded, key=lambda slot: slot.silent_since)
    return Admission(admit=True, evict=victim.key)
