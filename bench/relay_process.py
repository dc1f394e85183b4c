"""The gateway's relay alone in a process, as the bulk and idle benchmarks measure it.

    python -m bench.relay_process UPSTREAM_PORT [--streams] [--uvloop]

Runs one :class:`gateway.relay.SessionListener` (no connection limit, no deadlines that a
benchmark would hit) in front of ``127.0.0.1:UPSTREAM_PORT``, prints its port, and runs
until stdin closes. ``--streams`` picks the portable data path, ``--uvloop`` that loop.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

from gateway.fdlimit import raise_fd_limit
from gateway.models import ConnectionRecord, utcnow
from gateway.relay import RelayLimits, SessionListener, splice

LIMITS = RelayLimits(max_connections=1_000_000, preauth_timeout=3600.0)


class NullObserver:
    async def connection_opened(self, record: ConnectionRecord) -> None:
        return None

    async def connection_closed(self, record: ConnectionRecord) -> None:
        return None

    def connection_ended_before_kex(self, record: ConnectionRecord) -> None:
        return None

    def connection_refused(self, session_id: str) -> None:
        return None


async def serve(upstream_port: int, *, use_splice: bool) -> None:
    listener = SessionListener(
        "bench", "bench", 0, limits=LIMITS, observer=NullObserver(), clock=utcnow,
        splice=use_splice,
    )  # fmt: skip
    await listener.bind("127.0.0.1")
    listener.set_upstream("127.0.0.1", upstream_port)
    print(listener.port, flush=True)
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, sys.stdin.read)  # until the benchmark closes our stdin
    await listener.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("upstream_port", type=int)
    parser.add_argument("--streams", action="store_true", help="the portable data path")
    parser.add_argument("--uvloop", action="store_true", help="run on uvloop")
    args = parser.parse_args()
    raise_fd_limit()  # a thousand connections need more than a service's default 1024
    use_splice = splice.AVAILABLE and not args.streams
    if args.uvloop:
        import uvloop

        uvloop.run(serve(args.upstream_port, use_splice=use_splice))
    else:
        asyncio.run(serve(args.upstream_port, use_splice=use_splice))


if __name__ == "__main__":
    main()
