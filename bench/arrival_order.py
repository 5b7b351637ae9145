"""How often two commands sent on two connections without waiting reach Redis out of order.

    python -m bench.arrival_order --tries 500

The shape of the suite's "BRPOPLPUSH with multiple blocked clients" test, per try:

    c1, c2: fresh connections (SELECT 9 answered, as the suite's deferring clients)
    c3:     DEL blist target1 target2; SET target1 nolist          (answered)
    c1 -> BRPOPLPUSH blist target1 0     -- all three sent without waiting
    c2 -> BRPOPLPUSH blist target2 0
    c3 -> LPUSH blist foo

In order, Redis serves c1 first (WRONGTYPE, target1 is a string) and then c2 gets foo.
If c2's command arrived first, c2 gets foo and c1 stays blocked: the test waits forever.
After c2's reply, INFO's blocked_clients on c3 says which happened (c1 is served in the
same LPUSH as c2, so its count is settled by then). Direct, and through cacheport with
``relay: native`` at engine_threads 1 and 2, and ``relay: python``; with a Python client
(raw sockets) and with the suite's own Tcl client (``--client tcl``, tests/support/redis.tcl
from the source bench.conformance fetches), whose timing differs.
"""

from __future__ import annotations

import argparse
import contextlib
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from . import conformance as cf
from .sidebyside import free_port


class Conn:
    """A blocking RESP connection with just enough of a reader for these replies."""

    def __init__(self, port: int, timeout: float = 5.0) -> None:
        self.sock = socket.create_connection((cf.HOST, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""

    def send(self, *args: str) -> None:
        self.sock.sendall(cf._resp(*args))

    def _line(self) -> bytes:
        while b"\r\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed")
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\r\n")
        return line

    def reply(self) -> bytes:
        """One reply: simple string, error, integer or bulk string."""
        line = self._line()
        if line[:1] != b"$" or line == b"$-1":
            return line
        size = int(line[1:])
        while len(self.buf) < size + 2:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed")
            self.buf += chunk
        body, self.buf = self.buf[:size], self.buf[size + 2:]
        return body

    def call(self, *args: str) -> bytes:
        self.send(*args)
        return self.reply()

    def close(self) -> None:
        self.sock.close()


def blocked_clients(c: Conn) -> int:
    for line in c.call("INFO", "clients").decode().splitlines():
        if line.startswith("blocked_clients:"):
            return int(line.partition(":")[2])
    raise RuntimeError("INFO clients has no blocked_clients")


def tries(port: int, count: int) -> int:
    """How many of ``count`` tries had c2's command reach Redis before c1's."""
    reordered = 0
    main = Conn(port)
    try:
        for _ in range(count):
            deadline = time.monotonic() + 5
            while blocked_clients(main):  # the last try's c1 is still going away
                if time.monotonic() > deadline:
                    raise RuntimeError("a blocked client from the last try never went away")
                time.sleep(0.001)
            c1, c2 = Conn(port), Conn(port)
            try:
                for c in (c1, c2):
                    c.call("SELECT", "9")
                main.call("SELECT", "9")
                main.call("DEL", "blist", "target1", "target2")
                main.call("SET", "target1", "nolist")
                c1.send("BRPOPLPUSH", "blist", "target1", "0")
                c2.send("BRPOPLPUSH", "blist", "target2", "0")
                main.send("LPUSH", "blist", "foo")
                main.reply()
                if c2.reply() != b"foo":
                    raise RuntimeError("c2 did not get the element")
                reordered += blocked_clients(main)  # 1: c1 still waits, c2 went first
            finally:
                c1.close()
                c2.close()
    finally:
        main.close()
    return reordered


# The same tries with the suite's own client, run from the suite's source directory.
TCL = r"""
source tests/support/redis.tcl
set port [lindex $argv 0]
set n [lindex $argv 1]
set r [redis 127.0.0.1 $port]
$r select 9
set reordered 0
for {set i 0} {$i < $n} {incr i} {
    set waited 0
    while {[regexp {blocked_clients:([1-9])} [$r info clients]]} {
        if {[incr waited] > 5000} { error "a blocked client from the last try never went away" }
        after 1
    }
    set rd1 [redis 127.0.0.1 $port 1]
    $rd1 select 9
    $rd1 read
    set rd2 [redis 127.0.0.1 $port 1]
    $rd2 select 9
    $rd2 read
    $r del blist target1 target2
    $r set target1 nolist
    $rd1 brpoplpush blist target1 0
    $rd2 brpoplpush blist target2 0
    $r lpush blist foo
    if {[$rd2 read] ne "foo"} { error "rd2 did not get the element" }
    regexp {blocked_clients:(\d+)} [$r info clients] -> blocked
    incr reordered $blocked
    $rd1 close
    $rd2 close
}
puts $reordered
"""


def tcl_tries(port: int, count: int, src: Path) -> int:
    """``tries`` with the suite's Tcl client."""
    with tempfile.NamedTemporaryFile("w", suffix=".tcl") as script:
        script.write(TCL)
        script.flush()
        done = subprocess.run(["tclsh", script.name, str(port), str(count)], cwd=src,
                              capture_output=True, text=True, timeout=600, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"tclsh: {done.stderr.strip()[-300:]}")
    return int(done.stdout.split()[-1])


@dataclass(frozen=True, slots=True)
class Setup:
    label: str
    relay: str | None  # None: direct
    engine_threads: int | None = None


SETUPS = (
    Setup("direct", None),
    Setup("relay: native, engine_threads: 1", "native", 1),
    Setup("relay: native, engine_threads: 2", "native", 2),
    Setup("relay: python", "python"),
)


@contextlib.contextmanager
def address(setup: Setup, tmp: Path) -> Iterator[int]:
    with cf.redis_server("plain", tmp / "redis", tmp) as upstream:
        if setup.relay is None:
            yield upstream
            return
        listen = free_port()
        config = cf.cacheport_config(cf.kind(setup.relay), upstream, listen, tmp, tmp / "state",
                                     setup.engine_threads)
        with cf.cacheport(config, tmp / "cacheport"):
            cf.wait_until(lambda: cf.port_open(listen), 20, f"cacheport on {listen}")
            yield listen


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.arrival_order",
                                     description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--tries", type=int, default=500)
    parser.add_argument("--client", choices=("python", "tcl"), default="python",
                        help="raw sockets, or the Redis suite's own Tcl client")
    parser.add_argument("--out", type=Path, default=None, help="also write the table here")
    args = parser.parse_args(argv)
    src = cf.fetch_suite() if args.client == "tcl" else None
    lines = [f"BRPOPLPUSH on c1, then c2, then LPUSH on c3, without waiting ({args.client} "
             f"client): {args.tries} tries each, {datetime.now(UTC):%Y-%m-%d %H:%M} UTC", "",
             "| path | c2 reached Redis first | of | wall |", "|---|---|---|---|"]
    for setup in SETUPS:
        with tempfile.TemporaryDirectory(prefix="arrival-") as tmp, \
                address(setup, Path(tmp)) as port:
            start = time.monotonic()
            count = tries(port, args.tries) if src is None else \
                tcl_tries(port, args.tries, src)
            wall = time.monotonic() - start
        lines.append(f"| {setup.label} | {count} | {args.tries} | {wall:.1f} s |")
        print(lines[-1], file=sys.stderr, flush=True)
    table = "\n".join(lines) + "\n"
    print(table)
    if args.out:
        args.out.write_text(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
