"""Redis's own test suite, direct and through every kind of cacheport listener.

    python -m bench.conformance                  # every unit (about 4 min a run, 8 runs)
    python -m bench.conformance --subset         # the protocol-edge units CI runs
    python -m bench.conformance --units unit/protocol unit/multi --kinds native

The suite is the Tcl ``runtest`` from the distribution's source package of the installed
redis-server (``apt-get source redis=<version>``, cached outside git in
``~/.cache/cacheport/redis-src``). Every run gets a fresh redis-server on a free loopback
port and, for a cacheport kind, a fresh ``python -m proxy run`` with one listener:

    runtest --host 127.0.0.1 --port P --tags -slow --durable [--tls] [--cluster-mode]
        -> [cacheport listener] -> redis-server

Each cacheport run is compared test by test with its baseline (direct; redis-server's own
TLS for the TLS listener; the direct single-node cluster for ``clusters:``). Exit status:
0 when every test that passes on the baseline passes through cacheport and no run hung,
1 otherwise, 2 when the suite or what it needs cannot be had (the message says what).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

from bench.sidebyside import bindable

ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"

# The units CI runs: the protocol edges (inline and malformed requests, blocking list
# commands, pub/sub and sharded pub/sub, MULTI/EXEC, tracking, CLIENT and INFO).
SUBSET = ("unit/protocol", "unit/type/list", "unit/pubsub", "unit/pubsubshard", "unit/multi",
          "unit/tracking", "unit/introspection", "unit/info-command")
# The TLS runs take three times as long (a Tcl TLS handshake per connection): in CI they
# leave out unit/type/list, which is about data structures more than about the stream.
SUBSET_TLS = tuple(u for u in SUBSET if u != "unit/type/list")

# Tests skipped in every run (direct too, so the comparison stays fair), with the reason.
# Each sends a command on one connection and, without waiting for its reply, a command on
# another that must reach Redis after it: with engine_threads > 1 two connections are
# relayed by different threads and the second can arrive first (docs/conformance.md,
# "Arrival order across connections").
_ORDER = ("needs a command sent on one connection, unanswered, to reach Redis before the "
          "next command on another connection (docs/conformance.md, 'Arrival order across "
          "connections'): ")
SKIPPED = {
    "BRPOPLPUSH with multiple blocked clients":
        _ORDER + "BRPOPLPUSH on rd1, BRPOPLPUSH on rd2, LPUSH on r; when rd2's arrives "
        "first, rd1 stays blocked and the test reads from it forever",
    "BRPOPLPUSH does not affect WATCH while still blocked":
        _ORDER + "EXEC on the watching client (not yet answered), then LPUSH on r; when "
        "LPUSH arrives first, the blocked BRPOPLPUSH writes the WATCHed key and EXEC aborts",
    "PUBLISH/SUBSCRIBE after UNSUBSCRIBE without arguments":
        _ORDER + "UNSUBSCRIBE on rd1 (its reply is not read), then PUBLISH on r expecting "
        "0 receivers",
    "PUBLISH/PSUBSCRIBE after PUNSUBSCRIBE without arguments":
        _ORDER + "PUNSUBSCRIBE on rd1 (its reply is not read), then PUBLISH on r expecting "
        "0 receivers",
    "SPUBLISH/SSUBSCRIBE after UNSUBSCRIBE without arguments":
        _ORDER + "SUNSUBSCRIBE on rd1 (its reply is not read), then SPUBLISH on r expecting "
        "0 receivers",
    "SUBSCRIBE to one channel more than once":
        "needs the close of one connection to reach Redis before a command on another "
        "(docs/conformance.md, 'Arrival order across connections'): the previous test "
        "closes its two clients subscribed to chan1, then this one's PUBLISH on r expects "
        "1 receiver; when PUBLISH arrives first it finds 3",
}

# What the suite needs: --tags -slow (the slow tests need a local server), --durable (an
# error in one test does not end the run).
SUITE_FLAGS = ("--tags", "-slow", "--durable")
SERVER_FLAGS = ("--enable-debug-command", "yes", "--enable-protected-configs", "yes",
                "--enable-module-command", "yes")
CLUSTER_PORTS = 4  # ports of a clusters: entry (one node needs one)

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_ELAPSED = re.compile(r" \((\d+) ms\)$")
_DONE = re.compile(r"^\[\d+/\d+ done\]: (\S+)")
_IN_PROGRESS = re.compile(r"=> \(IN PROGRESS\) (.*)$")
STALL = "no progress within the stall timeout"
MAX_HANGS = 3  # hangs in one unit before the run moves on to the next unit


class SuiteUnavailable(Exception):
    """The suite, or something it needs, cannot be had here; the message says what."""


# ---------------------------------------------------------------------------
# The suite's output, test by test (no I/O)


@dataclass(frozen=True, slots=True)
class Outcome:
    """One test's result as the suite printed it."""

    unit: str
    name: str
    status: str  # ok, err, hang (no progress: killed), skip, ignore
    detail: str = ""


@dataclass(slots=True)
class Interruption:
    """A unit the suite did not finish: a hang (killed on a deadline) or an exception."""

    unit: str
    kind: str  # "hang" or "exception"
    test: str  # the test running, or the last one finished before it
    detail: str = ""

    def __str__(self) -> str:
        extra = f": {self.detail}" if self.detail else ""
        return f"{self.kind} in {self.unit}, test {self.test!r}{extra}"


class OutputParser:
    """Feeds on the suite's output line by line and keeps every test's outcome.

    External mode runs one test client, so units come one after another: ``Testing
    unit/x`` opens a unit, ``[ok]``/``[err]``/``[skip]``/``[ignore]`` lines close tests,
    ``[n/m done]: unit/x`` closes the unit, ``[exception]`` ends the whole suite and
    ``[TIMEOUT]`` (the suite's own stall timer) is followed by the test in progress.
    """

    def __init__(self) -> None:
        self.outcomes: list[Outcome] = []
        self.unit = ""
        self.done: list[str] = []
        self.interruptions: list[Interruption] = []
        self.ended = False  # "The End" was printed
        self._detail_for: int | None = None  # index of an [err] still reading its message
        self._timeout = False
        self.tail: deque[str] = deque(maxlen=6)  # the last lines, to say why it stopped

    @property
    def last_test(self) -> str:
        for outcome in reversed(self.outcomes):
            if outcome.unit == self.unit:
                return outcome.name
        return "(before the first test)"

    def feed(self, raw: str) -> None:
        line = _ANSI.sub("", raw).rstrip("\r\n")
        self.tail.append(line)
        if self._detail_for is not None:
            if line and not line.startswith(("[", "Testing ")) and not line.startswith("  "):
                outcome = self.outcomes[self._detail_for]
                if outcome.detail.count(" / ") < 1:  # the message: its first two lines
                    detail = f"{outcome.detail} / {line.strip()}" if outcome.detail else \
                        line.strip()
                    self.outcomes[self._detail_for] = Outcome(
                        outcome.unit, outcome.name, outcome.status, detail[:300])
                return
            self._detail_for = None
        if line.startswith("Testing "):
            self.unit = line.removeprefix("Testing ").strip()
            return
        if self._timeout and (match := _IN_PROGRESS.search(line)):
            self.interruptions.append(Interruption(self.unit, "hang", match.group(1), STALL))
            self._timeout = False
            return
        if (match := _DONE.match(line)) is not None:
            self.done.append(match.group(1))
            return
        if line.strip() == "The End":
            self.ended = True
            return
        status, sep, rest = line.partition("]: ")
        if not sep or not status.startswith("["):
            return
        status = status[1:]
        if status == "ok":
            self.outcomes.append(Outcome(self.unit, _ELAPSED.sub("", rest), "ok"))
        elif status == "err":
            name, _, _ = rest.rpartition(" in tests/")
            self.outcomes.append(Outcome(self.unit, name or rest, "err"))
            self._detail_for = len(self.outcomes) - 1
        elif status in ("skip", "ignore"):
            self.outcomes.append(Outcome(self.unit, rest, status))
        elif status == "exception":
            self.interruptions.append(Interruption(self.unit, "exception", self.last_test,
                                                   rest.strip()[:300]))
        elif status == "TIMEOUT":
            self._timeout = True


def parse_output(text: str) -> OutputParser:
    """The parser after all of ``text``."""
    parser = OutputParser()
    for line in text.splitlines():
        parser.feed(line)
    return parser


def ran(outcomes: Iterable[Outcome]) -> dict[tuple[str, str, int], Outcome]:
    """Tests that ran (ok, err or hang), keyed by unit, name and which of that name it was."""
    seen: Counter[tuple[str, str]] = Counter()
    keyed: dict[tuple[str, str, int], Outcome] = {}
    for outcome in outcomes:
        if outcome.status not in ("ok", "err", "hang"):
            continue
        seen[outcome.unit, outcome.name] += 1
        keyed[outcome.unit, outcome.name, seen[outcome.unit, outcome.name]] = outcome
    return keyed


@dataclass(slots=True)
class SuiteRun:
    """One run of the suite against one address."""

    kind: str
    outcomes: list[Outcome] = field(default_factory=list)
    interruptions: list[Interruption] = field(default_factory=list)
    wall: float = 0.0
    not_run: list[str] = field(default_factory=list)  # units never reached (deadline)
    unavailable: str = ""  # why this run could not happen at all
    log: Path | None = None

    def count(self, *statuses: str) -> int:
        return sum(1 for o in self.outcomes if o.status in statuses)


@dataclass(slots=True)
class Comparison:
    """A cacheport run against its baseline, test by test."""

    kind: str
    baseline: str
    regressions: list[tuple[Outcome, Outcome | None]]  # ok on the baseline, not through
    improvements: list[Outcome]  # err on the baseline, ok through cacheport

    @property
    def clean(self) -> bool:
        return not self.regressions


def compare(kind: SuiteRun, baseline: SuiteRun) -> Comparison:
    """Every test that passed on ``baseline`` and did not pass (or did not run) in ``kind``."""
    base, through = ran(baseline.outcomes), ran(kind.outcomes)
    regressions = [(b, through.get(key)) for key, b in base.items()
                   if b.status == "ok" and (key not in through or through[key].status != "ok")]
    improvements = [t for key, t in through.items()
                    if t.status == "ok" and key in base and base[key].status != "ok"]
    return Comparison(kind.kind, baseline.kind, regressions, improvements)


# ---------------------------------------------------------------------------
# The kinds of run


@dataclass(frozen=True, slots=True)
class Kind:
    """One way to reach redis-server: direct, or through one kind of cacheport listener."""

    name: str
    label: str
    server: str  # plain, tls or cluster
    listener: str | None  # None: direct; else native, python, tls, cluster, native-cluster
    baseline: str | None
    suite_flags: tuple[str, ...] = ()
    without: tuple[str, ...] = ()  # units left out of this kind's runs (WITHOUT says why)


KINDS = (
    Kind("direct", "direct", "plain", None, None),
    Kind("native", "plain listener, relay: native", "plain", "native", "direct"),
    Kind("python", "plain listener, relay: python", "plain", "python", "direct"),
    Kind("direct-tls", "direct, redis-server's own TLS", "tls", None, None, ("--tls",),
         ("unit/tls",)),
    Kind("tls", "TLS-terminating listener, plain server", "plain", "tls", "direct-tls",
         ("--tls",), ("unit/tls",)),
    Kind("tls-native", "TLS-terminating listener, relay: native", "plain", "tls-native",
         "direct-tls", ("--tls",), ("unit/tls",)),
    Kind("direct-cluster", "single-node cluster, direct", "cluster", None, None,
         ("--cluster-mode",)),
    Kind("cluster", "single-node cluster, clusters: entry, relay: python", "cluster",
         "cluster", "direct-cluster", ("--cluster-mode",)),
    Kind("native-cluster", "single-node cluster, clusters: entry, relay: native", "cluster",
         "native-cluster", "direct-cluster", ("--cluster-mode",)),
)
KIND_NAMES = tuple(k.name for k in KINDS)
WITHOUT = {
    "unit/tls": "it tests redis-server's own TLS settings (tls-auth-clients, tls-ciphers, "
                "replication over TLS); behind a TLS-terminating listener the server has no "
                "TLS and those settings are cacheport's, so they cannot pass there (and its "
                "failed replication test leaves the server a replica for the units after it)",
}


def kind(name: str) -> Kind:
    return next(k for k in KINDS if k.name == name)


def with_baselines(names: Iterable[str]) -> list[Kind]:
    """The kinds asked for and the baselines they are compared with, in KINDS order."""
    wanted = set(names)
    for name in list(wanted):
        baseline = kind(name).baseline
        if baseline is not None:
            wanted.add(baseline)
    return [k for k in KINDS if k.name in wanted]


def cacheport_config(k: Kind, upstream: int, listen: int, certs: Path, state: Path,
                     engine_threads: int | None = None) -> dict[str, Any]:
    """The port map of a cacheport run: one listener (or one cluster) and nothing else.

    Health checks are off: their connections would show in CLIENT LIST and INFO, which
    the suite counts, and a direct connection has none.
    """
    top: dict[str, Any] = {"defaults": {"health": False}, "admin": False}
    if engine_threads is not None:
        top["engine_threads"] = engine_threads
    if k.listener in ("cluster", "native-cluster"):
        # Each names its relay: the comparison holds whichever one is the default.
        top["state_dir"] = str(state)
        top["clusters"] = [{
            "name": "conformance", "engine": "redis-cluster", "seed": f"{HOST}:{upstream}",
            "announce": HOST, "listen": HOST, "seed_port": listen,
            "ports": f"{listen + 1}-{listen + CLUSTER_PORTS}",
            "relay": "native" if k.listener == "native-cluster" else "python"}]
        return top
    listener: dict[str, Any] = {"name": "conformance", "listen": f"{HOST}:{listen}",
                                "upstream": f"{HOST}:{upstream}", "protocol": "redis"}
    if k.listener in ("native", "python"):
        listener["relay"] = k.listener
    elif k.listener in ("tls", "tls-native"):
        listener["tls"] = {"cert": str(certs / "server.crt"), "key": str(certs / "server.key"),
                           "client_ca": str(certs / "ca.crt")}
        listener["relay"] = "native" if k.listener == "tls-native" else "python"
    top["listeners"] = [listener]
    return top


# ---------------------------------------------------------------------------
# The suite's source


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(os.environ.get("CACHEPORT_REDIS_SRC") or Path(base) / "cacheport" / "redis-src")


def _run(cmd: Sequence[str], timeout: float, cwd: Path | None = None
         ) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          check=False)


def installed_redis_version() -> str:
    """The installed redis-server package's version, as dpkg knows it."""
    if shutil.which("dpkg-query") is None:
        raise SuiteUnavailable("dpkg-query not found: the suite comes from the Debian/Ubuntu "
                               "source package of redis-server, and this is not such a system")
    done = _run(["dpkg-query", "-W", "-f", "${Version}", "redis-server"], 30)
    if done.returncode != 0 or not done.stdout.strip():
        raise SuiteUnavailable("redis-server is not installed as a Debian package "
                               "(dpkg-query -W redis-server); scripts/bootstrap.sh installs it")
    return done.stdout.strip()


def _upstream(version: str) -> str:
    """``5:7.0.15-1~deb12u10`` -> ``7.0.15``."""
    without_epoch = version.split(":", 1)[-1]
    return without_epoch.rpartition("-")[0] or without_epoch


def _source_versions() -> list[str]:
    done = _run(["apt-cache", "showsrc", "redis"], 60)
    return re.findall(r"^Version: (\S+)$", done.stdout, re.MULTILINE)


def _missing_tools() -> list[str]:
    tools = {"apt-get": "apt", "dpkg-source": "dpkg-dev", "tclsh": "tcl", "openssl": "openssl"}
    return [pkg for tool, pkg in tools.items() if shutil.which(tool) is None]


def _tcl_tls() -> bool:
    try:
        done = subprocess.run(["tclsh"], input="exit [catch {package require tls}]\n",
                              capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


CERT_DAYS = 300  # the suite's certificates are made again after this many days

SETUP_HINT = ("as root, scripts/bootstrap.sh (or scripts/conformance.sh) installs tcl, tcl-tls, "
              "dpkg-dev and openssl and adds a deb-src entry for redis-server's mirror")


def fetch_suite(cache: Path | None = None, say: Callable[[str], None] = print) -> Path:
    """The unpacked source of the installed redis-server's package, fetched once.

    ``apt-get source redis=<installed version>`` (the same upstream version if the mirror
    has moved on), its test certificates made by its own utils/gen-test-certs.sh.
    """
    cache = cache or cache_dir()
    version = installed_redis_version()
    target = cache / f"redis-{re.sub(r'[^A-Za-z0-9.+~-]', '_', version)}"
    if (target / ".complete").exists():
        ca = target / "tests" / "tls" / "ca.crt"
        if ca.exists() and time.time() - ca.stat().st_mtime > CERT_DAYS * 86400:
            # gen-test-certs.sh signs for 365 days: sign again before they expire.
            _run(["bash", "utils/gen-test-certs.sh"], 300, cwd=target)
        return target
    missing = _missing_tools()
    if missing:
        raise SuiteUnavailable(f"missing {', '.join(missing)}: {SETUP_HINT}")
    versions = _source_versions()
    if not versions:
        raise SuiteUnavailable("apt has no source package for redis (no deb-src entry, or "
                               f"no apt-get update since it was added): {SETUP_HINT}")
    if version in versions:
        chosen = version
    else:
        same = [v for v in versions if _upstream(v) == _upstream(version)]
        if not same:
            raise SuiteUnavailable(
                f"the mirror has redis source {', '.join(versions)}, none of upstream version "
                f"{_upstream(version)} (redis-server {version} is installed)")
        chosen = same[-1]
        say(f"conformance: redis source {version} is gone from the mirror; using {chosen}, "
            "the same upstream version")
    cache.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".fetch-", dir=cache))
    try:
        say(f"conformance: apt-get source redis={chosen} into {cache}")
        done = _run(["apt-get", "source", "-qq", "--only-source", f"redis={chosen}"], 600,
                    cwd=work)
        unpacked = [p.parent for p in work.glob("redis-*/runtest")]
        if done.returncode != 0 or not unpacked:
            tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
            raise SuiteUnavailable(f"apt-get source redis={chosen} failed: {' / '.join(tail)}")
        src = unpacked[0]
        certs = _run(["bash", "utils/gen-test-certs.sh"], 300, cwd=src)
        if certs.returncode != 0:
            say("conformance: utils/gen-test-certs.sh failed; the TLS runs will not run: "
                + certs.stderr.strip()[-200:])
        _link_binaries(src)
        (src / ".complete").write_text(f"{chosen}\n")
        with contextlib.suppress(OSError):  # another run may have finished first
            src.rename(target)
        if not (target / ".complete").exists():
            raise SuiteUnavailable(f"could not move the source into {target}")
        return target
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _link_binaries(src: Path) -> None:
    """The suite calls src/redis-cli and friends: point them at the installed ones."""
    for name in ("redis-server", "redis-cli", "redis-benchmark", "redis-check-aof",
                 "redis-check-rdb"):
        path = shutil.which(name)
        if path and not (src / "src" / name).exists():
            (src / "src" / name).symlink_to(path)


def all_units(src: Path) -> list[str]:
    done = _run(["./runtest", "--list-tests"], 60, cwd=src)
    units = [u for u in done.stdout.split() if u.startswith(("unit/", "integration/"))]
    if not units:
        raise SuiteUnavailable(f"./runtest --list-tests in {src} listed no units: "
                               f"{(done.stderr or done.stdout).strip()[-300:]}")
    return units


# ---------------------------------------------------------------------------
# Processes: each started in its own session, stopped by PID


_BASEPORTS: set[int] = set()  # handed out by this process: concurrent runs never share one
_BASEPORTS_LOCK = threading.Lock()


def suite_baseport() -> int:
    """A ``--baseport`` for runtest: its test server takes a port from the 32 below it, and
    checks each (and each + 10000) wrongly, on the wildcard address; the default (21111)
    is shared by every run on the machine, so concurrent runs would collide. Runs of this
    process at once get ranges apart (a range is free only until runtest binds it)."""
    rng = random.Random()
    with _BASEPORTS_LOCK:
        for _ in range(200):
            base = rng.randrange(12000, 22000)
            if any(abs(base + 32 - taken) < 64 for taken in _BASEPORTS):
                continue
            if bindable([*range(base, base + 32), *range(base + 10000, base + 10032)], ("",)):
                _BASEPORTS.add(base + 32)
                return base + 32
    raise RuntimeError("no free range of ports for the suite's test server")


_TAKEN: set[int] = set()  # ports this process's runs were given (they run concurrently)
_TAKEN_LOCK = threading.Lock()


def take_ports(count: int = 1) -> int:
    """The first of ``count`` free consecutive loopback ports no other run of this process
    was given: a free port stays free only until its server binds it, and concurrent runs
    would otherwise be handed the same one in between. They come from 23000-32000, below
    the ephemeral ports (which the suites' own connections take) and above where runtest's
    test server binds (suite_baseport)."""
    rng = random.Random()
    with _TAKEN_LOCK:
        for _ in range(200):
            base = rng.randrange(23000, 32000 - count)
            block = range(base, base + count)
            if _TAKEN.intersection(block) or not bindable(block, (HOST,)):
                continue
            _TAKEN.update(block)
            return base
    raise RuntimeError(f"no {count} free consecutive ports")


def port_open(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=0.2):
            return True
    except OSError:
        return False


def wait_until(predicate: Callable[[], object], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            raise RuntimeError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.05)


def stop(proc: subprocess.Popen[Any]) -> None:
    """SIGTERM, then SIGKILL, to the process's own group (it was started in a session)."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
    # Anything the suite left in the group (a test client) goes too.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


def _command(resp: bytes, port: int) -> bytes:
    with socket.create_connection((HOST, port), timeout=5) as s:
        s.sendall(resp)
        return s.recv(65536)


def _resp(*args: str) -> bytes:
    parts = [f"*{len(args)}\r\n".encode()]
    for a in args:
        parts.append(f"${len(a.encode())}\r\n{a}\r\n".encode())
    return b"".join(parts)


@contextlib.contextmanager
def redis_server(mode: str, workdir: Path, certs: Path) -> Iterator[int]:
    """A fresh redis-server (plain, own TLS, or a lone cluster node owning every slot)."""
    port = take_ports()
    workdir.mkdir(parents=True, exist_ok=True)
    args = ["redis-server", "--bind", HOST, "--save", "", "--appendonly", "no",
            "--daemonize", "no", "--dir", str(workdir), "--logfile", str(workdir / "redis.log"),
            *SERVER_FLAGS]
    if mode == "tls":
        args += ["--port", "0", "--tls-port", str(port),
                 "--tls-cert-file", str(certs / "server.crt"),
                 "--tls-key-file", str(certs / "server.key"),
                 "--tls-client-cert-file", str(certs / "client.crt"),
                 "--tls-client-key-file", str(certs / "client.key"),
                 "--tls-dh-params-file", str(certs / "redis.dh"),
                 "--tls-ca-cert-file", str(certs / "ca.crt")]
    else:
        args += ["--port", str(port)]
    if mode == "cluster":
        args += ["--cluster-enabled", "yes", "--cluster-config-file",
                 str(workdir / "nodes.conf"), "--cluster-port", str(take_ports())]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        def up() -> bool:
            if proc.poll() is not None:
                raise RuntimeError(f"redis-server exited {proc.returncode}; see "
                                   f"{workdir / 'redis.log'}")
            return port_open(port)

        wait_until(up, 15, f"redis-server on port {port}")
        if mode == "cluster":
            _command(_resp("CLUSTER", "ADDSLOTSRANGE", "0", "16383"), port)
            wait_until(lambda: b"cluster_state:ok" in _command(_resp("CLUSTER", "INFO"), port),
                       30, "cluster_state:ok on the lone node")
        yield port
    finally:
        stop(proc)


@contextlib.contextmanager
def cacheport(config: dict[str, Any], workdir: Path) -> Iterator[Path]:
    """``python -m proxy run -c <yaml>``: started, waited for, stopped by PID."""
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / "cacheport.yaml"
    path.write_text(yaml.safe_dump(config))
    log = workdir / "cacheport.log"
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["PYTHONUNBUFFERED"] = "1"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "proxy", "run", "-c", str(path)],
                                stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                                start_new_session=True)
    try:
        def serving() -> bool:
            if proc.poll() is not None:
                raise RuntimeError(f"cacheport exited {proc.returncode}:\n"
                                   f"{log.read_text(errors='replace')[-2000:]}")
            return "cacheport serving" in log.read_text(errors="replace")

        wait_until(serving, 20, "cacheport to start serving")
        yield log
    finally:
        stop(proc)


# ---------------------------------------------------------------------------
# Running the suite


@dataclass(frozen=True, slots=True)
class Limits:
    """Time bounds of one run: the suite's own stall timer and a hard deadline."""

    deadline: float  # seconds for the whole run, all units
    stall: int  # seconds without a test finishing before the suite gives up (--timeout)


def run_suite(src: Path, kind_name: str, port: int, units: Sequence[str],
              flags: Sequence[str], limits: Limits, log: Path,
              skip: Iterable[str] = tuple(SKIPPED)) -> SuiteRun:
    """``runtest`` against ``port``, every unit, resumed after a hang or an exception.

    A test that hangs is named by the suite's own ``[TIMEOUT]`` report; it is recorded
    as ``hang`` and its unit runs again without it (at most ``MAX_HANGS`` times a unit),
    so one hang costs one test, not the rest of the unit. After an ``[exception]`` (which
    ends the suite) or a kill at the deadline the run resumes at the next unit.
    """
    run = SuiteRun(kind_name, log=log)
    pending = list(units)
    skip = list(skip)
    hung: dict[str, list[str]] = {}  # unit -> tests that hung in it, skipped on a rerun
    start = time.monotonic()
    end = start + limits.deadline
    with open(log, "w") as out:
        while pending:
            left = end - time.monotonic()
            if left <= 0:
                run.not_run = pending
                break
            cmd = ["./runtest", "--host", HOST, "--port", str(port), *SUITE_FLAGS,
                   "--timeout", str(limits.stall), "--baseport", str(suite_baseport()),
                   *flags]
            for name in [*skip, *hung.get(pending[0], [])]:
                cmd += ["--skiptest", name]
            for unit in pending:
                cmd += ["--single", unit]
            out.write(f"$ {' '.join(cmd)}\n")
            parser = _run_once(cmd, src, out, left)
            stopped = parser.unit or pending[0]
            if parser.ended and not parser.interruptions:
                run.outcomes += parser.outcomes
                break
            if not parser.unit:  # it never started a unit: running it again will not help
                run.interruptions.append(Interruption(
                    pending[0], "exit", "(none)",
                    "the suite did not start: " + " / ".join(parser.tail)[-400:]))
                run.not_run = pending
                break
            if not parser.interruptions:  # killed at the deadline, or died
                killed = time.monotonic() >= end
                parser.interruptions.append(Interruption(
                    stopped, "hang" if killed else "exit", parser.last_test,
                    "killed at the run's deadline" if killed else "the suite stopped early"))
            run.interruptions += parser.interruptions
            last = parser.interruptions[-1]
            rerun = (last.kind == "hang" and last.detail == STALL and stopped in pending
                     and len(hung.get(stopped, [])) < MAX_HANGS)
            if rerun:
                # The unit runs again from its start: keep only the rerun's outcomes of it.
                hung.setdefault(stopped, []).append(last.test)
                run.outcomes += [o for o in parser.outcomes if o.unit != stopped]
                run.outcomes.append(Outcome(stopped, last.test, "hang", last.detail))
                pending = pending[pending.index(stopped):]
            else:
                run.outcomes += parser.outcomes
                if last.kind == "hang":
                    run.outcomes.append(Outcome(stopped, last.test, "hang", last.detail))
                pending = pending[pending.index(stopped) + 1:] if stopped in pending else []
    # A unit rerun without its hung test reports it as skipped: it hung, it was not skipped.
    hangs = {(o.unit, o.name) for o in run.outcomes if o.status == "hang"}
    run.outcomes = [o for o in run.outcomes
                    if not (o.status == "skip" and (o.unit, o.name) in hangs)]
    run.wall = time.monotonic() - start
    return run


def _run_once(cmd: list[str], src: Path, out: Any, timeout: float) -> OutputParser:
    parser = OutputParser()
    proc = subprocess.Popen(cmd, cwd=src, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, errors="replace", start_new_session=True)
    assert proc.stdout is not None

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            out.write(line)
            parser.feed(line)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        pass
    finally:
        stop(proc)
        reader.join(10)
        proc.stdout.close()
        out.flush()
    return parser


@dataclass(slots=True)
class Report:
    """Every run and every comparison of one conformance run."""

    units: list[str]
    tls_units: list[str]
    runs: dict[str, SuiteRun] = field(default_factory=dict)
    comparisons: list[Comparison] = field(default_factory=list)
    source: str = ""

    @property
    def failed(self) -> bool:
        broken = any(r.interruptions or r.not_run for r in self.runs.values())
        return broken or any(not c.clean for c in self.comparisons)


def conformance(units: Sequence[str] | None, kinds: Sequence[str], limits: Limits,
                logs: Path, say: Callable[[str], None] = print,
                engine_threads: int | None = None, skip: Iterable[str] = tuple(SKIPPED),
                src: Path | None = None, tls_units: Sequence[str] | None = None,
                parallel: int = 1) -> Report:
    """Run the suite for each kind (and its baseline) and compare; raises SuiteUnavailable.

    ``units`` None: every unit. ``tls_units``: the units of the ``--tls`` runs (default:
    the same). ``parallel``: kinds run at once. Each run has its own redis-server, its own
    cacheport and its own copy of the suite, so they share nothing; most of a run's wall
    time is the suite waiting (blocking timeouts, ``after``), so a few at once cost little.
    """
    src = src or fetch_suite(say=say)
    chosen = list(units) if units else all_units(src)
    report = Report(chosen, list(tls_units or chosen),
                    source=(src / ".complete").read_text().strip())
    logs.mkdir(parents=True, exist_ok=True)
    skip = tuple(skip)
    wanted = with_baselines(kinds)
    with tempfile.TemporaryDirectory(prefix="conformance-") as tmp:
        todo: list[tuple[Kind, list[str]]] = []
        for k in wanted:
            why = _unavailable(k, src / "tests" / "tls")
            if why:
                report.runs[k.name] = SuiteRun(k.name, unavailable=why)
                say(f"conformance: {k.name}: not run: {why}")
                continue
            mine = report.tls_units if "--tls" in k.suite_flags else chosen
            todo.append((k, [u for u in mine if u not in k.without]))

        def one(k: Kind, mine: list[str]) -> SuiteRun:
            # A copy per run: the suite writes (and at its start empties) tests/tmp.
            work = Path(tmp) / k.name / "suite"  # not "redis": redis-server's --dir
            shutil.copytree(src, work, symlinks=True)
            say(f"conformance: {k.name} ({k.label}): {len(mine)} unit(s)")
            run = _one_kind(k, work, work / "tests" / "tls", Path(tmp) / k.name, mine,
                            limits, logs / f"{k.name}.log", engine_threads, skip)
            say(f"conformance: {k.name}: {run.count('ok')} ok, {run.count('err', 'hang')} err, "
                f"{run.wall:.0f} s" + "".join(f"; {i}" for i in run.interruptions))
            return run

        # The TLS runs are the longest: started first, they do not end the run alone.
        todo.sort(key=lambda item: "--tls" not in item[0].suite_flags)
        with ThreadPoolExecutor(max(1, parallel), thread_name_prefix="conformance") as pool:
            futures = {k.name: pool.submit(one, k, mine) for k, mine in todo}
            done = {name: future.result() for name, future in futures.items()}
    # The table keeps KINDS order, whatever order the runs ended in.
    report.runs = {k.name: done.get(k.name) or report.runs[k.name] for k in wanted}
    for k in wanted:
        run = report.runs[k.name]
        base = report.runs.get(k.baseline or "")
        if base is not None and not run.unavailable and not base.unavailable:
            report.comparisons.append(compare(run, base))
    return report


def _unavailable(k: Kind, certs: Path) -> str:
    if "--tls" in k.suite_flags:
        if not (certs / "ca.crt").exists():
            return "no test certificates (utils/gen-test-certs.sh failed when fetched)"
        if not _tcl_tls():
            return f"Tcl has no tls package (apt-get install tcl-tls): {SETUP_HINT}"
    if k.listener in ("native", "native-cluster"):
        sys.path.insert(0, str(ROOT))
        from proxy.relay.engine import native_available

        if not native_available():
            return "the native relay engine is not built here (no C compiler?)"
    if k.listener == "tls-native":
        sys.path.insert(0, str(ROOT))
        from proxy.relay.engine import native_tls_available

        if not native_tls_available():
            return "the native relay engine was not built with libssl here"
    return ""


def _one_kind(k: Kind, work: Path, certs: Path, tmp: Path, units: Sequence[str],
              limits: Limits, log: Path, engine_threads: int | None,
              skip: Sequence[str]) -> SuiteRun:
    with redis_server(k.server, tmp / "redis", certs) as upstream:
        if k.listener is None:
            return run_suite(work, k.name, upstream, units, k.suite_flags, limits, log, skip)
        listen = take_ports(CLUSTER_PORTS + 1 if k.server == "cluster" else 1)
        config = cacheport_config(k, upstream, listen, certs, tmp / "state", engine_threads)
        with cacheport(config, tmp / "cacheport"):
            wait_until(lambda: port_open(listen), 20, f"cacheport listening on {listen}")
            run = run_suite(work, k.name, listen, units, k.suite_flags, limits, log, skip)
        shutil.copy(tmp / "cacheport" / "cacheport.log", log.with_suffix(".cacheport.log"))
        return run


# ---------------------------------------------------------------------------
# The table


def format_report(report: Report, skip: Iterable[str] = tuple(SKIPPED)) -> str:
    """The table (run | ok | err | skipped | wall | vs baseline) and what differs."""
    tls = "" if report.tls_units == report.units else \
        f" ({len(report.tls_units)} in the TLS runs)"
    lines = [f"Redis test suite ({report.source}), {len(report.units)} unit(s){tls}, flags "
             f"{' '.join(SUITE_FLAGS)}, {datetime.now(UTC):%Y-%m-%d %H:%M} UTC",
             "units: " + " ".join(report.units) if len(report.units) <= 20 else "units: all",
             "",
             "| run | ok | err | skipped | wall | vs baseline |", "|---|---|---|---|---|---|"]
    verdicts = {c.kind: c for c in report.comparisons}
    for name, run in report.runs.items():
        label = kind(name).label
        if run.unavailable:
            lines.append(f"| {label} | | | | | not run: {run.unavailable} |")
            continue
        notes = []
        if name in verdicts:
            c = verdicts[name]
            notes.append(f"same as {c.baseline}" if c.clean else
                         f"**{len(c.regressions)} pass on {c.baseline} and not here**")
            if c.improvements:
                notes.append(f"{len(c.improvements)} fail on {c.baseline} and pass here")
        notes += [str(i) for i in run.interruptions]
        if run.not_run:
            notes.append(f"deadline: {len(run.not_run)} unit(s) not run")
        lines.append(f"| {label} | {run.count('ok')} | {run.count('err', 'hang')} | "
                     f"{run.count('skip', 'ignore')} | {run.wall:.0f} s | {'; '.join(notes)} |")
    for name, run in report.runs.items():
        errs = [o for o in run.outcomes if o.status == "err"]
        if errs and not kind(name).baseline:
            lines.append("")
            lines.append(f"Failing on {name} (the baseline) too:")
            lines += [f"  - {o.unit}: {o.name}: {o.detail}" for o in errs]
    for c in report.comparisons:
        if c.regressions:
            lines.append("")
            lines.append(f"Pass on {c.baseline}, not through {c.kind}:")
            for base, through in c.regressions:
                got = f"{through.status}: {through.detail}" if through else "not run"
                lines.append(f"  - {base.unit}: {base.name} -- {got}")
    left_out = sorted({(u, k.name) for name in report.runs for k in [kind(name)]
                       for u in k.without if u in report.units or u in report.tls_units})
    if left_out:
        lines.append("")
        lines.append("Units left out of some runs:")
        for unit in sorted({u for u, _ in left_out}):
            kinds = ", ".join(n for u, n in left_out if u == unit)
            lines.append(f"  - {unit} ({kinds}): {WITHOUT[unit]}")
    skipped = [name for name in skip if name in SKIPPED]
    if skipped:
        lines.append("")
        lines.append("Skipped in every run (--skiptest):")
        lines += [f"  - {name!r}: {SKIPPED[name]}" for name in skipped]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.conformance",
                                     description=__doc__.split("\n\n")[0] if __doc__ else None)
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--subset", action="store_true", help=f"only {', '.join(SUBSET)}")
    which.add_argument("--units", nargs="+", metavar="UNIT", help="e.g. unit/protocol")
    parser.add_argument("--kinds", nargs="+", choices=KIND_NAMES, default=list(KIND_NAMES),
                        help="cacheport kinds (their baselines run too); default: all")
    parser.add_argument("--deadline", type=float, default=None,
                        help="seconds for one run of the suite (default 1500, subset 150)")
    parser.add_argument("--stall", type=int, default=None,
                        help="seconds one test may run before it counts as a hang "
                             "(default 120, subset 20)")
    parser.add_argument("--engine-threads", type=int, default=None,
                        help="engine_threads of the cacheport runs (default: auto)")
    parser.add_argument("--parallel", type=int, default=1,
                        help="kinds run at once (each has its own servers; default 1)")
    parser.add_argument("--no-skip", action="store_true",
                        help="run the tests SKIPPED lists too (e.g. with --engine-threads 1)")
    parser.add_argument("--logs", type=Path, default=None,
                        help="where the suite's output goes (default build/conformance/<time>)")
    parser.add_argument("--out", type=Path, default=None, help="also write the table here")
    args = parser.parse_args(argv)
    small = bool(args.subset or args.units)
    units = list(SUBSET) if args.subset else args.units
    limits = Limits(deadline=args.deadline or (150.0 if small else 1500.0),
                    stall=args.stall or (20 if small else 120))
    logs = args.logs or ROOT / "build" / "conformance" / f"{datetime.now(UTC):%Y%m%d-%H%M%S}"
    skip = () if args.no_skip else tuple(SKIPPED)

    def say(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    try:
        report = conformance(units, args.kinds, limits, logs, say, args.engine_threads, skip,
                             tls_units=SUBSET_TLS if args.subset else None,
                             parallel=args.parallel)
    except SuiteUnavailable as exc:
        print(f"conformance: cannot run Redis's test suite: {exc}", file=sys.stderr)
        return 2
    table = format_report(report, skip)
    print(table)
    say(f"conformance: the suite's output is in {logs}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(table)
    return 1 if report.failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
