"""Many stand-in cache nodes in one process, for the scale bench's checked listeners.

``python -m bench.nodes COUNT PORTFILE [--max-seconds S]`` binds COUNT loopback
ports (port 0 each), writes them to PORTFILE as JSON, and answers what a health
check asks: ``+PONG`` per ``PING``, ``+OK`` per ``AUTH``. A thousand redis-servers
would cost gigabytes; one process answering PING is all a check sees of a node,
and it is the same for cacheport and HAProxy. Its own CPU is not counted. It
exits on SIGTERM or after ``--max-seconds`` (a bench that dies leaves no
orphan running for long).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import resource
import signal
import socket
from collections.abc import Sequence
from pathlib import Path


class _Node(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        reply = b"+OK\r\n" * data.count(b"AUTH") + b"+PONG\r\n" * data.count(b"PING")
        self.transport.write(reply or b"-ERR unknown command\r\n")  # type: ignore[attr-defined]


async def serve(count: int, portfile: Path, max_seconds: float) -> None:
    loop = asyncio.get_running_loop()
    servers = []
    ports = []
    for _ in range(count):
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sock.listen(64)
        ports.append(sock.getsockname()[1])
        servers.append(await loop.create_server(_Node, sock=sock))
    await asyncio.to_thread(portfile.write_text, json.dumps(ports))
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), max_seconds)
    for server in servers:
        server.close()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.nodes", description=__doc__)
    parser.add_argument("count", type=int)
    parser.add_argument("portfile", type=Path)
    parser.add_argument("--max-seconds", type=float, default=3600.0)
    args = parser.parse_args(argv)
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    try:
        import uvloop
        uvloop.install()
    except ImportError:
        pass
    asyncio.run(serve(args.count, args.portfile, args.max_seconds))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
