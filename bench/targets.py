"""The cache servers and the targets measured in front of them.

A target is a way for the client to reach the cache servers: ``direct``, the
kernel's ``dnat`` rule (``--netns`` only), cacheport, and the peers a user
would otherwise pick, each in the configuration the issue names:

- ``haproxy``        HAProxy ``mode tcp`` as shipped (only maxconn and timeouts set)
- ``haproxy-tuned``  tune.bufsize 64k, tune.pipesize 1M, maxpipes, splice-auto, nbthread 1
- ``haproxy-splice`` the tuned globals with ``option splice-request`` + ``splice-response``
- ``nginx``          stream module, worker_processes 1, tcp_nodelay on, proxy_buffer_size 64k
- ``socat``          one forked child per connection, 64 KiB buffers, TCP_NODELAY

Not in the default set: ``haproxy-busy`` (haproxy-tuned + ``busy-polling``, HAProxy's
answer to the wake-up cost that cacheport's ``busy_poll`` also addresses; it keeps one CPU
at 100 % while it is up, so measure it in a run of its own) and
cacheport variants (``cacheport-nospin`` is ``busy_poll: off``, and so on).

Each ``launch()`` writes its own configuration, starts the process(es) in the
NAT namespace (or on loopback) and waits until every listener accepts.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import yaml

from .procs import BenchError, Proc, Reaper, wait_port
from .topology import Topology, add_dnat, remove_dnat

ROOT = Path(__file__).resolve().parent.parent
BACKENDS = ("redis", "memcached")
PEERS = ("haproxy", "haproxy-tuned", "haproxy-splice", "nginx")
ALL_TARGETS = ("direct", "dnat", "cacheport", "cacheport-2w", "haproxy", "haproxy-tuned",
               "haproxy-splice", "nginx", "socat", "cacheport-splice", "cacheport-buffer",
               "cacheport-1t", "cacheport-nocheck", "cacheport-python", "cacheport-nospin",
               "haproxy-busy")
DEFAULT_TARGETS = ("direct", "dnat", "cacheport", "haproxy", "haproxy-tuned", "haproxy-splice",
                   "nginx", "socat")
# Port-map keys that sit at the top of the file; any other key a cacheport target is given
# (``--cacheport-set``, ``ab --a``/``--b``) goes into ``defaults:``.
TOP_LEVEL_KEYS = ("workers", "engine_threads", "busy_poll", "drain_timeout")
NGINX_STREAM_MODULE = Path("/usr/lib/nginx/modules/ngx_stream_module.so")
IDLE_TIMEOUT = "10m"  # every peer keeps idle connections at least this long


@dataclass
class Backend:
    """A real memcached or redis-server started for the run."""

    kind: str
    host: str
    port: int
    proc: Proc
    argv: list[str]


def start_backends(reaper: Reaper, topo: Topology, kinds: tuple[str, ...],
                   max_clients: int) -> dict[str, Backend]:
    result: dict[str, Backend] = {}
    for kind in kinds:
        host = topo.cache_host
        # The cache namespace is the servers' own: they get their usual ports there.
        port = {"redis": 6379, "memcached": 11211}[kind] if topo.cache_ns else topo.ports(host)
        if kind == "memcached":
            exe = _need("memcached")
            user = ["-u", "root"] if _is_root() else []
            # -I 2m: 1 MB values fit; -c: the connections workload holds thousands.
            argv = [exe, *user, "-l", host, "-p", str(port), "-U", "0", "-m", "256",
                    "-I", "2m", "-c", str(max_clients)]
        else:
            exe = _need("redis-server")
            argv = [exe, "--port", str(port), "--bind", host, "--save", "", "--appendonly", "no",
                    "--daemonize", "no", "--logfile", "", "--loglevel", "warning",
                    "--protected-mode", "no", "--maxclients", str(max_clients)]
        proc = reaper.spawn(kind, [*topo.prefix(topo.cache_ns), *argv])
        wait_port(host, port, proc, 15, topo.client_ns)
        result[kind] = Backend(kind, host, port, proc, argv)
    return result


def _is_root() -> bool:
    import os

    return os.geteuid() == 0


def _need(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise BenchError(f"{name} is not installed")
    return path


@dataclass
class Running:
    """A launched target: where the client connects per backend, and whose CPU to count."""

    name: str
    endpoints: dict[str, tuple[str, int]]
    procs: list[Proc] = field(default_factory=list)
    config: str = ""
    undo: list[Callable[[], None]] = field(default_factory=list)

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def alive(self) -> bool:
        return all(p.alive() for p in self.procs)

    def stop(self, reaper: Reaper) -> None:
        for proc in self.procs:
            reaper.stop(proc)
        for undo in self.undo:
            undo()
        self.undo.clear()


@dataclass(frozen=True)
class Options:
    """Settings shared by every target launch."""

    max_conns: int
    nofile: int  # RLIMIT_NOFILE the targets inherit
    cacheport_protocol: str  # "native" (protocol: redis/memcached) or "tcp"
    cacheport_defaults: tuple[tuple[str, str], ...] = ()


class Target:
    """How to start one kind of target; ``launch`` can run more than once (fresh instances)."""

    kind = "proxy"  # "direct" | "kernel" | "proxy"

    def __init__(self, name: str, description: str) -> None:
        self.name = name
        self.description = description
        self.launches = 0

    def unavailable(self, topo: Topology) -> str | None:
        """Why this target cannot run here, or None."""
        return None

    def version(self) -> str:
        return ""

    def launch(self, reaper: Reaper, topo: Topology, backends: dict[str, Backend],
               opts: Options, workdir: Path) -> Running:
        raise NotImplementedError

    def _listen(self, topo: Topology, backends: dict[str, Backend],
                ports: Callable[[str], int]) -> dict[str, tuple[str, int]]:
        return {kind: (topo.proxy_host, ports(topo.proxy_host)) for kind in backends}


    def _tag(self) -> str:
        self.launches += 1
        return f"{self.name}-{self.launches}"


class Direct(Target):
    kind = "direct"

    def launch(self, reaper: Reaper, topo: Topology, backends: dict[str, Backend],
               opts: Options, workdir: Path) -> Running:
        return Running(self.name, {k: (b.host, b.port) for k, b in backends.items()})


class Dnat(Target):
    kind = "kernel"

    def unavailable(self, topo: Topology) -> str | None:
        if topo.nat_ns is None:
            return "iptables DNAT is measured with --netns only (it needs a NAT hop)"
        if shutil.which("iptables") is None:
            return "iptables is not installed"
        return None

    def version(self) -> str:
        return _first_line(["iptables", "--version"])

    def launch(self, reaper: Reaper, topo: Topology, backends: dict[str, Backend],
               opts: Options, workdir: Path) -> Running:
        ports = topo.ports
        endpoints = self._listen(topo, backends, ports)
        run = Running(self.name, endpoints)
        rules = []
        for kind, (_host, port) in endpoints.items():
            b = backends[kind]
            rules.append(add_dnat(topo, port, b.host, b.port))
            run.undo.append(partial(remove_dnat, topo, port, b.host, b.port))
        run.config = "\n".join(rules)
        return run


class Cacheport(Target):
    """``cacheport run`` with a generated port map: one listener per backend.

    ``settings`` are this variant's port-map keys (``TOP_LEVEL_KEYS`` at the top, the
    rest in ``defaults:``); they are applied after the run's ``--cacheport-set``.
    """

    def __init__(self, name: str, description: str,
                 settings: dict[str, object] | None = None) -> None:
        super().__init__(name, description)
        self.settings = settings or {}

    def version(self) -> str:
        return _first_line([sys.executable, "-m", "proxy", "--version"], cwd=ROOT)

    def launch(self, reaper: Reaper, topo: Topology, backends: dict[str, Backend],
               opts: Options, workdir: Path) -> Running:
        tag = self._tag()
        endpoints = self._listen(topo, backends, topo.ports)
        top: dict[str, object] = {}
        defaults: dict[str, object] = {"connect_timeout": "3s"}
        given = {k: yaml.safe_load(v) for k, v in opts.cacheport_defaults}
        for key, value in {**given, **self.settings}.items():
            (top if key in TOP_LEVEL_KEYS else defaults)[key] = value
        if topo.client_net is not None:
            # A listener others can reach needs an allow list (as any operator's would).
            defaults["allow"] = [topo.client_net]
        listeners = []
        for kind, (host, port) in endpoints.items():
            b = backends[kind]
            listeners.append({
                "name": kind, "listen": f"{host}:{port}", "upstream": f"{b.host}:{b.port}",
                "protocol": kind if opts.cacheport_protocol == "native" else "tcp",
            })
        doc: dict[str, object] = {**top, "defaults": defaults, "listeners": listeners}
        text = yaml.safe_dump(doc, sort_keys=False)
        path = workdir / f"{tag}.yaml"
        path.write_text(text)
        env = _env()
        proc = reaper.spawn(tag, [*topo.prefix(topo.nat_ns), sys.executable, "-m", "proxy",
                                  "run", "-c", str(path), "--log-level", "warning"],
                            env=env, cwd=ROOT)
        run = Running(self.name, endpoints, [proc], text)
        _wait_all(run, topo)
        return run


class Haproxy(Target):
    def __init__(self, name: str, description: str, variant: str) -> None:
        super().__init__(name, description)
        self.variant = variant

    def unavailable(self, topo: Topology) -> str | None:
        return None if shutil.which("haproxy") else "haproxy is not installed"

    def version(self) -> str:
        return _first_line(["haproxy", "-v"])

    def config(self, endpoints: dict[str, tuple[str, int]], backends: dict[str, Backend],
               opts: Options) -> str:
        maxconn = max(2000, opts.max_conns + 500)
        # HAProxy wants 2 fds per connection and 2 per pipe, and refuses to start if
        # RLIMIT_NOFILE is lower: give the pipes what the limit leaves.
        maxpipes = max(0, min(maxconn, (opts.nofile - 2 * maxconn - 200) // 2))
        glob = [f"    maxconn {maxconn}"]
        defaults = ["    mode tcp", "    timeout connect 3s",
                    f"    timeout client {IDLE_TIMEOUT}", f"    timeout server {IDLE_TIMEOUT}",
                    f"    maxconn {maxconn}"]
        if self.variant in ("tuned", "splice", "busy"):
            glob += ["    nbthread 1", "    tune.bufsize 65536", "    tune.pipesize 1048576",
                     f"    maxpipes {maxpipes}"]
        if self.variant == "busy":
            glob.append("    busy-polling")
        if self.variant in ("tuned", "busy"):
            defaults.append("    option splice-auto")
        elif self.variant == "splice":
            defaults += ["    option splice-request", "    option splice-response"]
        lines = ["global", *glob, "", "defaults", *defaults, ""]
        for kind, (host, port) in endpoints.items():
            b = backends[kind]
            lines += [f"listen {kind}", f"    bind {host}:{port}",
                      f"    server {kind}-node {b.host}:{b.port}", ""]
        return "\n".join(lines)

    def launch(self, reaper: Reaper, topo: Topology, backends: dict[str, Backend],
               opts: Options, workdir: Path) -> Running:
        tag = self._tag()
        endpoints = self._listen(topo, backends, topo.ports)
        text = self.config(endpoints, backends, opts)
        path = workdir / f"{tag}.cfg"
        path.write_text(text)
        # -db: foreground, no master process; the PID we hold is the proxy itself.
        proc = reaper.spawn(tag, [*topo.prefix(topo.nat_ns), _need("haproxy"), "-db", "-f",
                                  str(path)])
        run = Running(self.name, endpoints, [proc], text)
        _wait_all(run, topo)
        return run


class Nginx(Target):
    def unavailable(self, topo: Topology) -> str | None:
        exe = shutil.which("nginx")
        if exe is None:
            return "nginx is not installed (Debian: nginx-light libnginx-mod-stream)"
        flags = _nginx_flags(exe)
        if "--with-stream=dynamic" in flags and not NGINX_STREAM_MODULE.exists():
            return (f"nginx's stream module is not installed ({NGINX_STREAM_MODULE} is missing;"
                    " Debian: libnginx-mod-stream)")
        if "--with-stream" not in flags:
            return "this nginx was built without the stream module"
        return None

    def version(self) -> str:
        result = subprocess.run(["nginx", "-v"], capture_output=True, text=True, timeout=10,
                                check=False)
        return (result.stderr or result.stdout).strip()

    def config(self, prefix: Path, endpoints: dict[str, tuple[str, int]],
               backends: dict[str, Backend], opts: Options) -> str:
        exe = _need("nginx")
        load = (f"load_module {NGINX_STREAM_MODULE};\n"
                if "--with-stream=dynamic" in _nginx_flags(exe) else "")
        servers = "".join(
            f"    server {{\n        listen {host}:{port};\n"
            f"        proxy_pass {backends[kind].host}:{backends[kind].port};\n    }}\n"
            for kind, (host, port) in endpoints.items()
        )
        conns = max(2048, 2 * opts.max_conns + 1000)
        return (
            f"{load}daemon off;\nmaster_process on;\nworker_processes 1;\n"
            f"worker_rlimit_nofile {conns + 1000};\npid {prefix}/nginx.pid;\n"
            f"error_log stderr warn;\n"
            f"events {{\n    worker_connections {conns};\n}}\n"
            f"stream {{\n    tcp_nodelay on;\n    proxy_buffer_size 64k;\n"
            f"    proxy_connect_timeout 3s;\n    proxy_timeout {IDLE_TIMEOUT};\n{servers}}}\n"
        )

    def launch(self, reaper: Reaper, topo: Topology, backends: dict[str, Backend],
               opts: Options, workdir: Path) -> Running:
        tag = self._tag()
        prefix = workdir / tag
        prefix.mkdir(exist_ok=True)
        endpoints = self._listen(topo, backends, topo.ports)
        text = self.config(prefix, endpoints, backends, opts)
        path = prefix / "nginx.conf"
        path.write_text(text)
        exe = _need("nginx")
        check = subprocess.run([*topo.prefix(topo.nat_ns), exe, "-t", "-q", "-e", "stderr",
                                "-p", str(prefix), "-c", str(path)],
                               capture_output=True, text=True, timeout=30, check=False)
        if check.returncode != 0:
            raise BenchError(f"nginx rejected its configuration: {check.stderr.strip()[-400:]}")
        # SIGQUIT would wait for idle connections; SIGTERM is nginx's fast shutdown.
        proc = reaper.spawn(tag, [*topo.prefix(topo.nat_ns), exe, "-e", "stderr",
                                  "-p", str(prefix), "-c", str(path)])
        run = Running(self.name, endpoints, [proc], text)
        _wait_all(run, topo)
        proc.remember_tree()
        return run


class Socat(Target):
    def unavailable(self, topo: Topology) -> str | None:
        return None if shutil.which("socat") else "socat is not installed"

    def version(self) -> str:
        result = subprocess.run(["socat", "-V"], capture_output=True, text=True, timeout=10,
                                check=False)
        for line in result.stdout.splitlines():
            if line.startswith("socat version"):
                return line.strip()
        return ""

    def launch(self, reaper: Reaper, topo: Topology, backends: dict[str, Backend],
               opts: Options, workdir: Path) -> Running:
        tag = self._tag()
        endpoints = self._listen(topo, backends, topo.ports)
        exe = _need("socat")
        run = Running(self.name, endpoints)
        lines = []
        for kind, (host, port) in endpoints.items():
            b = backends[kind]
            argv = [exe, "-b", "65536",
                    f"TCP4-LISTEN:{port},bind={host},reuseaddr,fork,nodelay,backlog=1024",
                    f"TCP4:{b.host}:{b.port},nodelay"]
            lines.append(" ".join(argv))
            run.procs.append(reaper.spawn(f"{tag}-{kind}", [*topo.prefix(topo.nat_ns), *argv]))
        run.config = "\n".join(lines)
        _wait_all(run, topo)
        return run


def _wait_all(run: Running, topo: Topology) -> None:
    for i, (host, port) in enumerate(run.endpoints.values()):
        proc = run.procs[min(i, len(run.procs) - 1)] if run.procs else None
        wait_port(host, port, proc, 20, topo.client_ns)


def _nginx_flags(exe: str) -> str:
    result = subprocess.run([exe, "-V"], capture_output=True, text=True, timeout=10, check=False)
    return result.stderr + result.stdout


def _first_line(argv: list[str], cwd: Path | None = None) -> str:
    try:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=20, check=False,
                                cwd=cwd, env=_env())
    except (OSError, subprocess.TimeoutExpired):
        return ""
    out = (result.stdout or result.stderr).strip().splitlines()
    return out[0] if out else ""


def _env() -> dict[str, str]:
    import os

    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def make_targets() -> dict[str, Target]:
    return {
        "direct": Direct("direct", "client straight to the cache server"),
        "dnat": Dnat("dnat", "iptables -t nat PREROUTING DNAT on the NAT host (kernel)"),
        "cacheport": Cacheport("cacheport", "cacheport run, generated port map"),
        # HAProxy's defaults run a thread per core; this is cacheport's equivalent.
        "cacheport-2w": Cacheport("cacheport-2w", "cacheport with workers: 2 (SO_REUSEPORT)",
                                  {"workers": 2}),
        "cacheport-splice": Cacheport("cacheport-splice", "cacheport with copy: splice",
                                      {"copy": "splice"}),
        "cacheport-buffer": Cacheport("cacheport-buffer", "cacheport with copy: buffer",
                                      {"copy": "buffer"}),
        "cacheport-1t": Cacheport("cacheport-1t", "cacheport with engine_threads: 1",
                                  {"engine_threads": 1}),
        # What the health checks (on by default, every 2 s per node) cost the latency path.
        "cacheport-nocheck": Cacheport("cacheport-nocheck", "cacheport with health: off",
                                       {"health": "off"}),
        "cacheport-python": Cacheport("cacheport-python", "cacheport with relay: python "
                                      "(no native engine)", {"relay": "python"}),
        # What busy_poll (on by default, 50 us) buys and costs.
        "cacheport-nospin": Cacheport("cacheport-nospin", "cacheport with busy_poll: off",
                                      {"busy_poll": "off"}),
        "haproxy": Haproxy("haproxy", "HAProxy mode tcp, defaults", "default"),
        "haproxy-tuned": Haproxy("haproxy-tuned", "HAProxy tuned: bufsize 64k, pipesize 1M, "
                                 "maxpipes, splice-auto, nbthread 1", "tuned"),
        "haproxy-splice": Haproxy("haproxy-splice", "HAProxy tuned + splice-request + "
                                  "splice-response (always splice)", "splice"),
        "haproxy-busy": Haproxy("haproxy-busy", "HAProxy tuned + busy-polling (never sleeps: "
                                "one CPU at 100 % while it runs)", "busy"),
        "nginx": Nginx("nginx", "nginx stream: worker_processes 1, tcp_nodelay on, "
                       "proxy_buffer_size 64k"),
        "socat": Socat("socat", "socat fork per connection, -b 65536, nodelay"),
    }
