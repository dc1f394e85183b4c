"""The SSH port pool: which host ports a new session may try, lowest first."""

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

    def candidates(self, held: Collection[int]) -> Iterator[int]:
        """Ports no session holds, lowest first.

        The caller still has to bind each: a port another process holds is skipped
        by trying the next candidate.
        """
        return (port for port in range(self.start, self.end + 1) if port not in held)
