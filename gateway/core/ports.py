"""The SSH port pool: which host ports a new session may try, in order of preference."""

from __future__ import annotations

from collections.abc import Collection, Iterator
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class PortRange:
    """An inclusive range of host ports for session listeners."""

    start: int
    end: int

    def __post_init__(self) -> None:
        if not 1 <= self.start <= self.end <= 65535:
            raise ValueError(f"invalid port range {self.start}-{self.end}")

    def __len__(self) -> int:
        return self.end - self.start + 1

    def __contains__(self, port: object) -> bool:
        return isinstance(port, int) and self.start <= port <= self.end

    def candidates(
        self,
        held: Collection[int],
        *,
        preferred: int | None = None,
        claimed: Collection[int] = (),
    ) -> Iterator[int]:
        """Ports no session holds: the user's own ``preferred`` (sticky) port first, then
        ports no other user has claimed as theirs, lowest first, and only then ports other
        users claimed, in the order of ``claimed`` (the caller puts the longest unused
        first), so a user's port is given away only when the pool forces it.

        The caller still has to bind each: a port another process holds is skipped
        by trying the next candidate.
        """
        if preferred is not None and preferred in self and preferred not in held:
            yield preferred
        skip = {*held, preferred}
        unclaimed_skip = skip.union(claimed)
        yield from (p for p in range(self.start, self.end + 1) if p not in unclaimed_skip)
        yield from (p for p in claimed if p in self and p not in skip)
