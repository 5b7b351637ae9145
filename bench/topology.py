"""Where the client, the proxies and the cache servers run: loopback, or network namespaces.

``--netns`` builds the NAT-instance topology the issue describes::

    client ns            nat ns                               cache ns
    192.0.2.2  --veth--  192.0.2.1 | 198.51.100.1  --veth--  198.51.100.2
                         cacheport, HAProxy, nginx, socat     memcached, redis-server
                         iptables DNAT, ip_forward=1

Direct traffic is routed through the NAT namespace (no NAT), so "direct" and
"DNAT" differ only by the rule, and the proxies by userspace. Only documentation
ranges are used, and every namespace is deleted when the run ends (the veth
pairs, routes, sysctls and iptables rules live and die with them).
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
from dataclasses import dataclass, field
from functools import partial

from .procs import BenchError, Reaper, run_checked

CLIENT_NET = ("192.0.2.2", "192.0.2.1")  # client, NAT host (client side)
CLIENT_CIDR = "192.0.2.0/24"
CACHE_NET = ("198.51.100.2", "198.51.100.1")  # cache node, NAT host (cache side)
_STALE = re.compile(r"^cpb(\d+)-(client|nat|cache)$")


@dataclass(frozen=True)
class Topology:
    """Addresses and namespaces of the three roles; namespaces are None on loopback."""

    name: str
    client_ns: str | None
    nat_ns: str | None
    cache_ns: str | None
    proxy_host: str  # where the proxies listen and the DNAT rules match
    cache_host: str  # where the cache servers listen
    ports: PortAllocator = field(default_factory=lambda: PortAllocator(None))
    client_net: str | None = None  # the clients' CIDR, for allow lists; None on loopback

    def prefix(self, ns: str | None) -> list[str]:
        return ["ip", "netns", "exec", ns] if ns else []


class PortAllocator:
    """Free ports on loopback; on fresh namespaces nothing else listens, so just count.

    Counted ports stay below the namespaces' ephemeral range (10000-65000).
    """

    def __init__(self, fixed_start: int | None) -> None:
        self.next = fixed_start

    def __call__(self, host: str) -> int:
        if self.next is not None:
            self.next += 1
            return self.next - 1
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((host, 0))
            return int(s.getsockname()[1])


def loopback() -> Topology:
    return Topology("loopback", None, None, None, "127.0.0.1", "127.0.0.1")


def _ns_exec(ns: str, *argv: str) -> list[str]:
    return ["ip", "netns", "exec", ns, *argv]


def remove_stale() -> list[str]:
    """Delete namespaces left by a bench that was killed outright (its PID is gone)."""
    notes: list[str] = []
    try:
        listing = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True,
                                 timeout=10, check=False).stdout
    except (OSError, subprocess.TimeoutExpired):
        return notes
    for line in listing.splitlines():
        name = line.split()[0] if line.split() else ""
        m = _STALE.match(name)
        if not m or os.path.exists(f"/proc/{m.group(1)}"):
            continue
        pids = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True,
                              timeout=10, check=False).stdout.split()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid), signal.SIGKILL)
        subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=10,
                       check=False)
        notes.append(f"removed stale namespace {name} from an earlier run")
    return notes


def build_netns(reaper: Reaper) -> Topology:
    """Create the three namespaces; ``reaper`` deletes them when the run ends."""
    if os.geteuid() != 0:
        raise BenchError("--netns needs root (it creates network namespaces and iptables rules)")
    tag = f"cpb{os.getpid()}"
    client, nat, cache = f"{tag}-client", f"{tag}-nat", f"{tag}-cache"
    for ns in (client, nat, cache):
        run_checked(["ip", "netns", "add", ns], "creating namespace")
        reaper.on_close(f"deleting namespace {ns}", partial(_delete_ns, ns))
    short = str(os.getpid() % 100000)
    vc, vnc, vns, vs = f"cpb{short}c", f"cpb{short}nc", f"cpb{short}ns", f"cpb{short}s"
    steps: list[list[str]] = [
        ["ip", "link", "add", vc, "netns", client, "type", "veth", "peer", "name", vnc,
         "netns", nat],
        ["ip", "link", "add", vns, "netns", nat, "type", "veth", "peer", "name", vs,
         "netns", cache],
        ["ip", "-n", client, "addr", "add", f"{CLIENT_NET[0]}/24", "dev", vc],
        ["ip", "-n", nat, "addr", "add", f"{CLIENT_NET[1]}/24", "dev", vnc],
        ["ip", "-n", nat, "addr", "add", f"{CACHE_NET[1]}/24", "dev", vns],
        ["ip", "-n", cache, "addr", "add", f"{CACHE_NET[0]}/24", "dev", vs],
    ]
    for ns, devs in ((client, (vc, "lo")), (nat, (vnc, vns, "lo")), (cache, (vs, "lo"))):
        steps += [["ip", "-n", ns, "link", "set", dev, "up"] for dev in devs]
    steps += [
        ["ip", "-n", client, "route", "add", "default", "via", CLIENT_NET[1]],
        ["ip", "-n", cache, "route", "add", "default", "via", CACHE_NET[1]],
        _ns_exec(nat, "sysctl", "-qw", "net.ipv4.ip_forward=1"),
    ]
    # Thousands of short connections per run: let TIME_WAIT ports be reused (per namespace).
    for ns in (client, nat, cache):
        steps += [
            _ns_exec(ns, "sysctl", "-qw", "net.ipv4.tcp_tw_reuse=1"),
            _ns_exec(ns, "sysctl", "-qw", "net.ipv4.ip_local_port_range=10000 65000"),
        ]
    for argv in steps:
        run_checked(argv, "building the namespace topology")
    return Topology("netns", client, nat, cache, CLIENT_NET[1], CACHE_NET[0],
                    PortAllocator(7100), CLIENT_CIDR)


def _delete_ns(ns: str) -> None:
    run_checked(["ip", "netns", "del", ns], "deleting namespace")


def add_dnat(topo: Topology, port: int, node: str, node_port: int) -> str:
    """The NAT-instance recipe's rule, in the NAT namespace; returns it as text."""
    assert topo.nat_ns is not None
    rule = ["-t", "nat", "-A", "PREROUTING", "-p", "tcp", "--dport", str(port), "-j", "DNAT",
            "--to", f"{node}:{node_port}"]
    run_checked(_ns_exec(topo.nat_ns, "iptables", *rule), "adding the DNAT rule")
    return "iptables " + " ".join(rule)


def remove_dnat(topo: Topology, port: int, node: str, node_port: int) -> None:
    assert topo.nat_ns is not None
    rule = ["-t", "nat", "-D", "PREROUTING", "-p", "tcp", "--dport", str(port), "-j", "DNAT",
            "--to", f"{node}:{node_port}"]
    run_checked(_ns_exec(topo.nat_ns, "iptables", *rule), "removing the DNAT rule")
