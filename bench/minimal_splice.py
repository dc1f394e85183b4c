"""A reference, not the gateway: the least a splice relay on the asyncio loop can be (no
accounting, deadlines or banners; a full destination blocks the loop). It shows, in the
same run, how close the gateway's relay comes to the floor.

    python -m bench.minimal_splice UPSTREAM_PORT
"""

from __future__ import annotations

import asyncio
import os
import resource
import socket
import sys


def _direction(loop: asyncio.AbstractEventLoop, src: socket.socket, dst: socket.socket) -> None:
    read_end, write_end = os.pipe()

    def readable() -> None:
        count = os.splice(src.fileno(), write_end, 1 << 20, flags=os.SPLICE_F_NONBLOCK)
        if count == 0:
            loop.remove_reader(src.fileno())
            dst.shutdown(socket.SHUT_WR)
        while count:
            count -= os.splice(read_end, dst.fileno(), count)

    loop.add_reader(src.fileno(), readable)


async def serve(upstream_port: int) -> None:
    loop = asyncio.get_running_loop()
    server = socket.create_server(("127.0.0.1", 0))
    server.setblocking(False)
    print(server.getsockname()[1], flush=True)
    while True:
        client, _ = await loop.sock_accept(server)
        upstream = socket.create_connection(("127.0.0.1", upstream_port))
        client.setblocking(True)
        _direction(loop, client, upstream)
        _direction(loop, upstream, client)


if __name__ == "__main__":
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # 6 fds a connection
    asyncio.run(serve(int(sys.argv[1])))
