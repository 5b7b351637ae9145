"""The TLS bench's peers: stunnel, HAProxy ``ssl`` and nginx stream ``ssl``, each with a
terminating listener (TLS client -> peer -> plain node) and an originating one (plain
client -> peer -> TLS node, verifying its certificate and name, with SNI), configured
the way their documentation shows, on their defaults otherwise. A peer that is not
installed is skipped with the reason (Debian: stunnel4, haproxy, nginx-light and
libnginx-mod-stream)."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

NGINX_STREAM_MODULE = Path("/usr/lib/nginx/modules/ngx_stream_module.so")


@dataclass
class Pki:
    cert: Path
    key: Path
    ca: Path
    combined: Path  # cert then key: HAProxy's crt


@dataclass
class Legs:
    """Ports: the peer's two listeners and the two nodes behind them."""

    term: int
    orig: int
    node: int
    node_tls: int


def missing(name: str) -> str | None:
    if name == "stunnel":
        return None if shutil.which("stunnel4") or shutil.which("stunnel") else \
            "stunnel is not installed (Debian: stunnel4)"
    if name == "haproxy":
        return None if shutil.which("haproxy") else "haproxy is not installed"
    if name == "nginx":
        if shutil.which("nginx") is None:
            return "nginx is not installed (Debian: nginx-light libnginx-mod-stream)"
        flags = subprocess.run(["nginx", "-V"], capture_output=True, text=True,
                               check=False).stderr
        if "--with-stream=dynamic" in flags and not NGINX_STREAM_MODULE.exists():
            return "nginx's stream module is not installed (Debian: libnginx-mod-stream)"
    return None


def start(name: str, pki: Pki, legs: Legs, workdir: Path,
          procs: list[subprocess.Popen[bytes]]) -> None:
    """Start ``name`` (its PID goes on ``procs``); the caller waits for its ports."""
    if name == "stunnel":
        path = workdir / "stunnel.conf"
        path.write_text(
            f"foreground = yes\npid =\ndebug = 3\nsocket = l:TCP_NODELAY=1\n"
            f"socket = r:TCP_NODELAY=1\n\n"
            f"[term]\naccept = 127.0.0.1:{legs.term}\nconnect = 127.0.0.1:{legs.node}\n"
            f"cert = {pki.cert}\nkey = {pki.key}\n\n"
            f"[orig]\nclient = yes\naccept = 127.0.0.1:{legs.orig}\n"
            f"connect = 127.0.0.1:{legs.node_tls}\nCAfile = {pki.ca}\nverifyChain = yes\n"
            f"checkHost = localhost\nsni = localhost\n")
        exe = shutil.which("stunnel4") or shutil.which("stunnel") or "stunnel"
        procs.append(subprocess.Popen([exe, str(path)], stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL))
    elif name == "haproxy":
        path = workdir / "haproxy.cfg"
        path.write_text(
            "global\n    maxconn 8000\n\n"
            "defaults\n    mode tcp\n    timeout connect 5s\n    timeout client 1h\n"
            "    timeout server 1h\n\n"
            f"listen term\n    bind 127.0.0.1:{legs.term} ssl crt {pki.combined}\n"
            f"    server node 127.0.0.1:{legs.node}\n\n"
            f"listen orig\n    bind 127.0.0.1:{legs.orig}\n"
            f"    server node 127.0.0.1:{legs.node_tls} ssl verify required ca-file {pki.ca} "
            "sni str(localhost) verifyhost localhost\n")
        procs.append(subprocess.Popen([shutil.which("haproxy") or "haproxy", "-db", "-f",
                                       str(path)], stdout=subprocess.DEVNULL))
    elif name == "nginx":
        prefix = workdir / "nginx"
        prefix.mkdir(exist_ok=True)
        flags = subprocess.run(["nginx", "-V"], capture_output=True, text=True,
                               check=False).stderr
        load = f"load_module {NGINX_STREAM_MODULE};\n" if "--with-stream=dynamic" in flags \
            else ""
        path = prefix / "nginx.conf"
        path.write_text(
            f"{load}daemon off;\nmaster_process on;\nworker_processes auto;\n"
            f"worker_rlimit_nofile 16000;\npid {prefix}/nginx.pid;\nerror_log stderr error;\n"
            "events {\n    worker_connections 8000;\n}\n"
            "stream {\n    tcp_nodelay on;\n    proxy_timeout 1h;\n"
            f"    server {{\n        listen 127.0.0.1:{legs.term} ssl;\n"
            f"        ssl_certificate {pki.cert};\n        ssl_certificate_key {pki.key};\n"
            f"        ssl_session_cache shared:SSL:10m;\n"
            f"        proxy_pass 127.0.0.1:{legs.node};\n    }}\n"
            f"    server {{\n        listen 127.0.0.1:{legs.orig};\n"
            f"        proxy_pass 127.0.0.1:{legs.node_tls};\n        proxy_ssl on;\n"
            f"        proxy_ssl_verify on;\n        proxy_ssl_trusted_certificate {pki.ca};\n"
            f"        proxy_ssl_name localhost;\n        proxy_ssl_server_name on;\n    }}\n}}\n")
        procs.append(subprocess.Popen(["nginx", "-e", "stderr", "-p", str(prefix), "-c",
                                       str(path)], stdout=subprocess.DEVNULL))
    else:
        raise ValueError(name)


def version(name: str) -> str:
    argv = {"stunnel": [shutil.which("stunnel4") or "stunnel", "-version"],
            "haproxy": ["haproxy", "-v"], "nginx": ["nginx", "-v"]}[name]
    out = subprocess.run(argv, capture_output=True, text=True, check=False)
    lines = (out.stdout + out.stderr).strip().splitlines()
    named = [line for line in lines if name in line.lower()]
    return (named or lines or ["?"])[0].strip()
