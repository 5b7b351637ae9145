"""Test helpers: real cache servers on free ports, cacheport in a thread or a subprocess.

Every process started here is stopped by PID; every wait has a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from proxy.config import Config, load_yaml, parse_config
from proxy.server import Server

ROOT = Path(__file__).resolve().parent.parent
# The engine's framers without Python or sockets, in proxy/relay/: tests/framer_asan.c
# links these alone (the ASan tests of test_framer_fuzz.py and test_mc_framer_fuzz.py).
FRAMER_SOURCES = ("resp_framer.c", "resp_scan.c", "resp_match.c", "resp_request.c",
                  "mc_framer.c", "nodemap.c")


_handed_out: set[int] = set()
# Its own source of randomness: Hypothesis seeds the module's for each example, and both
# xdist workers would then try the same ports in the same order.
_random = random.SystemRandom()


def worker_share(low: int, high: int) -> tuple[int, int]:
    """This xdist worker's own slice of the ports ``low``-``high`` (all of them outside
    xdist): ports picked at random by the two workers then never coincide, not even in
    the moment between one picking a port and its process binding it."""
    name = os.environ.get("PYTEST_XDIST_WORKER", "")
    count = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1") or 1)
    width = (high - low) // max(count, 1)
    if count < 2 or not name.startswith("gw") or not name[2:].isdigit() or width < 2000:
        return low, high
    start = low + (int(name[2:]) % count) * width
    return start, start + width


def quiet_range() -> tuple[int, int] | None:
    """This worker's share of the ports below the kernel's ephemeral range
    (net.ipv4.ip_local_port_range), where no outgoing connection and no bind to port 0
    -- of either worker or anything else on the machine -- is given one; None if that
    range leaves no room."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    start = max(1024, low - 12768)
    return worker_share(start, low) if low - start >= 2000 else None


def _bindable(family: socket.AddressFamily, host: str, port: int) -> bool:
    """Whether ``port`` binds now on the family's wildcard and on ``host``: a listener on
    0.0.0.0 clashes with one on 127.0.0.1:port, and the reverse."""
    try:
        for address in ("::" if family == socket.AF_INET6 else "0.0.0.0", host):
            with socket.socket(family, socket.SOCK_STREAM) as s:
                s.bind((address, port))
    except OSError:
        return False
    return True


def free_port(host: str = "127.0.0.1") -> int:
    """A port free now, below the ephemeral range, and never handed out before in this
    process, for a listener a test or a child process binds a moment later.

    From the ephemeral range (a bind to port 0), the port could be taken in that moment by
    any new connection or port-0 listener on this busy machine; below it, only by a
    process that picks fixed ports another way (the other xdist worker has a share of its
    own). And two listeners of one test must not get the same port: hence the set of
    ports already handed out.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    quiet = quiet_range()
    for _ in range(200):
        if quiet is not None:
            port = _random.randrange(*quiet)
        else:  # no room below the ephemeral range here: one the kernel picks
            with socket.socket(family, socket.SOCK_STREAM) as s:
                s.bind((host, 0))
                port = int(s.getsockname()[1])
        if port not in _handed_out and _bindable(family, host, port):
            _handed_out.add(port)
            return port
    raise RuntimeError(f"no free port in 200 tries (below the ephemeral range: {quiet})")


def free_range(count: int, host: str = "127.0.0.1") -> int:
    """First of ``count`` consecutive ports free now, from ``free_port``'s share below the
    ephemeral range, none of them handed out before in this process (a cluster entry's
    port range)."""
    low, high = quiet_range() or worker_share(20000, 32000)
    for _ in range(200):
        block = range(base := _random.randrange(low, high - count), base + count)
        if _handed_out.isdisjoint(block) and all(
                _bindable(socket.AF_INET, host, port) for port in block):
            _handed_out.update(block)
            return base
    raise RuntimeError(f"no {count} consecutive free ports")


def until_closed(port: int, send: bytes = b"", host: str = "127.0.0.1",
                 timeout: float = 5) -> bytes:
    """Connect, send ``send``, read until the far side ends the connection; what was read.

    A reset is an end wherever it lands, connect() included: a proxy on a thread of this
    process can accept, fail and reset the connection while this thread waits for the GIL
    between the kernel's handshake and connect()'s check of the socket's error.
    """
    got = bytearray()
    with contextlib.suppress(ConnectionResetError, BrokenPipeError):
        with socket.create_connection((host, port), timeout=timeout) as sock:
            if send:
                sock.sendall(send)
            while chunk := sock.recv(1 << 16):
                got += chunk
    return bytes(got)


def wait_until(predicate: Callable[[], object], timeout: float, interval: float = 0.02,
               message: str = "condition") -> Any:
    """Poll ``predicate`` until it is truthy; fail the test with ``message`` at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {message}")
        time.sleep(interval)


def stop_process(proc: subprocess.Popen[Any], timeout: float = 5, *, kill: bool = False) -> None:
    """End a process we started, by PID: SIGTERM (SIGKILL with ``kill``), and SIGKILL if it
    has not exited within ``timeout``."""
    if proc.poll() is not None:
        return
    proc.kill() if kill else proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.2):
            return True
    except OSError:
        return False


VALKEY_DIR = ROOT / ".cache" / "valkey" / "usr" / "bin"  # where scripts/valkey.sh puts it


def valkey_server() -> str | None:
    """valkey-server on PATH, else the one scripts/valkey.sh unpacked; None without one."""
    found = shutil.which("valkey-server") or shutil.which("valkey-server", path=str(VALKEY_DIR))
    return found


def require_binary(name: str) -> str:
    path = shutil.which(name) if name != "valkey-server" else valkey_server()
    if path is None:
        raise RuntimeError(f"{name} is not installed; run scripts/test.sh, which installs it")
    return path


@dataclass
class ServerProcess:
    """A real cache server started for a test; ``stop()`` (or leaving a ``with`` block)
    ends it by PID."""

    kind: str
    proc: subprocess.Popen[bytes]
    port: int
    host: str = "127.0.0.1"
    args: list[str] = field(default_factory=list)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        # memcached takes ~1 s to finish on SIGTERM and keeps nothing worth a clean
        # shutdown here; redis-server stops at once.
        stop_process(self.proc, kill=self.kind == "memcached")

    def kill(self) -> None:
        """SIGKILL, as a crashed node."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=5)

    def restart(self) -> None:
        """Start the same server again on the same port."""
        self.stop()
        fresh = _spawn(self.kind, self.args, self.port, self.host)
        self.proc = fresh.proc


def _command(kind: str, port: int, extra: list[str], host: str) -> list[str]:
    if kind == "memcached":
        user = ["-u", "root"] if os.geteuid() == 0 else []
        return [require_binary("memcached"), *user, "-l", host, "-p", str(port),
                "-U", "0", "-m", "64", *extra]
    server = "valkey-server" if kind == "valkey" else "redis-server"
    return [require_binary(server), "--port", str(port), "--bind", host,
            "--save", "", "--appendonly", "no", "--daemonize", "no", "--logfile", "",
            "--loglevel", "warning", *extra]


def _spawn(kind: str, extra: list[str], port: int, host: str = "127.0.0.1") -> ServerProcess:
    proc = subprocess.Popen(_command(kind, port, extra, host), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    server = ServerProcess(kind, proc, port, host=host, args=list(extra))
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{kind} exited with {proc.returncode} on port {port}")
        if port_open(port, host):
            return server
        time.sleep(0.02)
    server.stop()
    raise RuntimeError(f"{kind} did not listen on port {port} within 10s")


def start_server(kind: str, extra: list[str] | None = None, host: str = "127.0.0.1",
                 port: int | None = None) -> ServerProcess:
    """Start memcached or redis-server on a free port (retrying if the port is raced)."""
    last: Exception | None = None
    for _ in range(3):
        try:
            return _spawn(kind, list(extra or []), port or free_port(host), host)
        except RuntimeError as exc:
            last = exc
    raise RuntimeError(f"could not start {kind}: {last}")


def make_config(listeners: list[dict[str, Any]], **top: Any) -> Config:
    """Build a Config through the real YAML validator.

    Health checks are off unless the test sets ``health`` (in ``defaults`` or on a
    listener): their connections would otherwise reach upstreams that tests watch.
    The admin endpoint is off unless the test sets ``admin``.
    """
    defaults = {"health": False, **(top.pop("defaults", None) or {})}
    top.setdefault("admin", False)  # no admin endpoint on the default port unless asked
    if top["admin"] == "implicit default":
        del top["admin"]  # as a port map without an admin block: 127.0.0.1:9180
    doc = {"defaults": defaults, "listeners": listeners, **top}
    return parse_config(load_yaml(yaml.safe_dump(doc)), "<test>")


class ProxyThread:
    """cacheport's Server on its own event loop in a background thread.

    The tests use blocking clients (pymemcache, redis-py), so the proxy cannot share
    their thread.
    """

    def __init__(self, config: Config, loop_kind: str = "uvloop") -> None:
        self.config = config
        self.loop_kind = loop_kind
        self.server = Server(config)
        self.loop: asyncio.AbstractEventLoop | None = None
        self._thread = threading.Thread(target=self._run, daemon=True, name="cacheport")
        self._started = threading.Event()
        self._error: BaseException | None = None
        self._stop_requested = False

    def _new_loop(self) -> asyncio.AbstractEventLoop:
        if self.loop_kind == "uvloop":
            import uvloop

            return uvloop.new_event_loop()  # type: ignore[no-any-return]
        return asyncio.new_event_loop()

    def _run(self) -> None:
        loop = self._new_loop()
        self.loop = loop
        try:
            loop.run_until_complete(self._main())
        except BaseException as exc:  # surfaced to the test by start()
            self._error = exc
            self._started.set()
        finally:
            loop.close()

    async def _main(self) -> None:
        await self.server.start()
        self._started.set()
        await self.server.wait_stopping()
        await self.server.stop(drain_timeout=self._drain)

    _drain = 0.0

    def start(self) -> ProxyThread:
        self._thread.start()
        if not self._started.wait(10):
            raise RuntimeError("cacheport did not start within 10s")
        if self._error is not None:
            raise self._error
        return self

    def port(self, name: str) -> int:
        bound = self.server.listeners[name].bound
        assert bound is not None
        return bound.port

    def call(self, fn: Callable[[], Any], timeout: float = 10) -> Any:
        """Run ``fn`` on the proxy's loop and return its result."""
        assert self.loop is not None

        async def runner() -> Any:
            result = fn()
            if asyncio.iscoroutine(result):
                result = await result
            return result

        return asyncio.run_coroutine_threadsafe(runner(), self.loop).result(timeout)

    def stop(self, drain: float = 0.0) -> None:
        if self.loop is None or not self._thread.is_alive():
            return
        self._drain = drain
        try:
            self.loop.call_soon_threadsafe(self.server.request_stop)
        except RuntimeError:
            pass  # the loop closed after the check above: the server stopped by itself
        self._thread.join(10 + drain)
        if self._thread.is_alive():
            # Name what the loop is still waiting on: the only lead to a hung stop.
            pending = sorted({repr(task.get_coro()) for task in asyncio.all_tasks(self.loop)})
            raise RuntimeError("cacheport thread did not stop within its deadline; "
                               f"pending tasks: {pending}")


@contextlib.contextmanager
def running_proxy(listeners: list[dict[str, Any]], loop_kind: str = "uvloop",
                  **top: Any) -> Iterator[ProxyThread]:
    proxy = ProxyThread(make_config(listeners, **top), loop_kind).start()
    try:
        yield proxy
    finally:
        proxy.stop()


def cacheport_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "proxy", *args]


def cacheport_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def run_cli(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """Run ``cacheport ARGS`` to completion."""
    return subprocess.run(cacheport_cmd(*args), capture_output=True, text=True,
                          timeout=timeout, env=cacheport_env(), cwd=ROOT)


class CacheportProcess:
    """``cacheport run`` as a subprocess, stopped by PID."""

    def __init__(self, config_path: Path, *extra: str, prefix: tuple[str, ...] = ()) -> None:
        self.log_path = config_path.with_suffix(".log")
        self._log = open(self.log_path, "wb")  # closed in stop()
        self.proc = subprocess.Popen(
            [*prefix, *cacheport_cmd("run", "-c", str(config_path), *extra)],
            stdout=self._log, stderr=subprocess.STDOUT, env=cacheport_env(), cwd=ROOT,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_serving(self, timeout: float = 15) -> None:
        def serving() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"cacheport exited {self.proc.returncode}:\n{self.log()}")
            return "cacheport serving" in self.log()

        wait_until(serving, timeout, message="cacheport to start serving")

    def signal(self, sig: int = signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)

    def wait(self, timeout: float = 15) -> int:
        return self.proc.wait(timeout)

    def stop(self) -> None:
        stop_process(self.proc, 10)
        self._log.close()


def copy_fields(copy: str) -> dict[str, str]:
    """Listener fields for a ``copy_mode`` name: ``native-splice`` is ``copy: splice`` in the
    native engine, a bare ``splice`` the same path in the Python relays."""
    relay, _, mode = copy.rpartition("-")
    return {"copy": mode, "relay": relay or "python"}


def drop_to_uid_without_pipe_budget(uid: int) -> list[tuple[int, int]] | None:
    """In a child run as root: become ``uid`` and use up that user's
    fs.pipe-user-pages-soft with 1 MiB pipes, so the kernel refuses the next large pipe.

    Returns the pipes held (keep them open), or None if the kernel never refused one.
    """
    os.setgroups([])
    os.setgid(uid)
    os.setuid(uid)
    held = []
    for _ in range(1024):
        r, w = os.pipe()
        held.append((r, w))
        try:
            fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, 1 << 20)
        except PermissionError:
            return held
    return None


def tcp_listener(port: int, **extra: object) -> list[dict[str, object]]:
    """A plain listener ``t`` on a free loopback port, relaying to ``port``.

    ``copy`` may be a ``copy_mode`` name (``copy_fields``), which sets ``relay`` too
    unless the caller gives it.
    """
    if "copy" in extra and "relay" not in extra:
        extra = {**extra, **copy_fields(str(extra["copy"]))}
    return [{"name": "t", "listen": "127.0.0.1:0", "upstream": f"127.0.0.1:{port}",
             "protocol": "tcp", **extra}]


def only_relay(proxy: ProxyThread, name: str = "t") -> Any:
    """The one live relay of listener ``name``."""
    return proxy.call(lambda: next(iter(proxy.server.listeners[name].relays)))
