"""A three-namespace copy of the AWS layout, for cluster tests (no tests here).

::

    ns "cli" 198.51.100.2 ---- 198.51.100.1 ns "nat" 192.0.2.1 ---- 192.0.2.11.. ns "vpc"
      the client                  cacheport (no forwarding)          the cache nodes

The client's namespace has one address and no route to 192.0.2.0/24, and the NAT
namespace does not forward, so the only way from the client to a node is through
cacheport -- exactly what a private ElastiCache subnet behind a NAT host looks like.
Only documentation ranges are used. Everything is created by ``NetnsLab.create`` and
removed by ``close`` (namespaces deleted, which also deletes their veth pairs).

``NsThread`` runs Python code *inside* a namespace: one worker thread that called
``setns(2)`` (a network namespace is per thread), so sockets it opens live there.
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import os
import shutil
import subprocess
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

CLONE_NEWNET = 0x40000000
VPC_NET = "192.0.2"
NAT_VPC_IP = "192.0.2.1"
NAT_IP = "198.51.100.1"
CLIENT_IP = "198.51.100.2"


class NamespaceUnavailable(Exception):
    """Network namespaces cannot be created here (not root, no iproute2, no CAP_SYS_ADMIN)."""


def _ip(*args: str) -> None:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=10)
    if result.returncode != 0:
        raise NamespaceUnavailable(f"ip {' '.join(args)}: {result.stderr.strip()}")


def enter_netns(name: str) -> None:
    """Move the calling thread into network namespace ``name``."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/var/run/netns/{name}", os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns({name}): {os.strerror(err)}")
    finally:
        os.close(fd)


class NsThread:
    """A single worker thread living in a namespace; ``run`` calls a function there."""

    def __init__(self, namespace: str) -> None:
        self.namespace = namespace
        self._pool = concurrent.futures.ThreadPoolExecutor(
            1, thread_name_prefix=f"netns-{namespace}", initializer=enter_netns,
            initargs=(namespace,))

    def run(self, fn: Callable[..., T], *args: Any, timeout: float = 30) -> T:
        return self._pool.submit(fn, *args).result(timeout)

    def submit(self, fn: Callable[..., T], *args: Any) -> concurrent.futures.Future[T]:
        """Start ``fn`` there without waiting for it."""
        return self._pool.submit(fn, *args)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


class NetnsLab:
    """The three namespaces and their links; names carry the test process's pid."""

    def __init__(self, vpc_hosts: int = 8) -> None:
        tag = f"cp{os.getpid() % 100000}"
        self.vpc, self.nat, self.cli = f"{tag}-vpc", f"{tag}-nat", f"{tag}-cli"
        self.vpc_ips = [f"{VPC_NET}.{11 + i}" for i in range(vpc_hosts)]
        self.created: list[str] = []
        self.threads: list[NsThread] = []

    def create(self) -> NetnsLab:
        if os.geteuid() != 0:
            raise NamespaceUnavailable("creating network namespaces needs root")
        if shutil.which("ip") is None:
            raise NamespaceUnavailable("the ip command (iproute2) is not installed")
        try:
            for ns in (self.vpc, self.nat, self.cli):
                subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10)
                _ip("netns", "add", ns)
                self.created.append(ns)
                _ip("-n", ns, "link", "set", "lo", "up")
            _ip("link", "add", "nat0", "netns", self.nat, "type", "veth",
                "peer", "name", "vpc0", "netns", self.vpc)
            _ip("link", "add", "nat1", "netns", self.nat, "type", "veth",
                "peer", "name", "cli0", "netns", self.cli)
            _ip("-n", self.nat, "addr", "add", f"{NAT_VPC_IP}/24", "dev", "nat0")
            _ip("-n", self.nat, "addr", "add", f"{NAT_IP}/24", "dev", "nat1")
            _ip("-n", self.cli, "addr", "add", f"{CLIENT_IP}/24", "dev", "cli0")
            for ip in self.vpc_ips:
                _ip("-n", self.vpc, "addr", "add", f"{ip}/24", "dev", "vpc0")
            for ns, dev in ((self.nat, "nat0"), (self.nat, "nat1"), (self.vpc, "vpc0"),
                            (self.cli, "cli0")):
                _ip("-n", ns, "link", "set", dev, "up")
        except BaseException:
            self.close()
            raise
        return self

    def thread(self, namespace: str) -> NsThread:
        t = NsThread(namespace)
        self.threads.append(t)
        return t

    def prefix(self, namespace: str) -> tuple[str, ...]:
        """Command prefix that runs a program in ``namespace`` (``ip netns exec`` execs it,
        so the child's pid is the program's)."""
        return ("ip", "netns", "exec", namespace)

    def close(self) -> None:
        for t in self.threads:
            t.close()
        for ns in reversed(self.created):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10)
        self.created.clear()
