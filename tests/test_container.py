"""The image, built from the Dockerfile and run by a real container engine.

::

    redis-server, memcached, a 3-master Redis Cluster     (loopback, started here)
          ^
          | host network
    podman run <deploy/compose.yaml's settings> localhost/cacheport-test   (uid 10001)
          ^
          | redis-cli, pymemcache, /status, podman healthcheck run, podman kill -s HUP

Podman, rootful and daemonless, with configuration of its own (tests/container_engine.py);
the base image comes from mmdebstrap and is cached by content key, and the project's
image is built through ``--build-arg BASE_IMAGE``, as a user with a mirrored base would.
Every container runs with the options deploy/compose.yaml gives it (the docs' run lines
are checked against the same, in test_packaging.py), so what runs here is what the guide
says -- all but its nofile ulimit, above this machine's hard limit: containers.conf sets
that limit instead. Run alone with ``pytest -m container``. Skipped only where podman, runc or
mmdebstrap cannot be had; under ``CI=true`` that is a failure instead.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from pymemcache.client.base import Client as MemcacheClient

from tests.cluster_helpers import free_range, three_masters
from tests.container_engine import (
    IMAGE,
    Podman,
    base_image,
    build_image,
    compose_run_options,
    unavailable,
)
from tests.support import (
    ServerProcess,
    free_port,
    require_binary,
    start_server,
    wait_until,
)

# Building the images is the module fixtures' work, bounded by their own subprocess
# deadlines; each test's own steps get this long.
pytestmark = [pytest.mark.container, pytest.mark.timeout(90, func_only=True)]

HOST = "127.0.0.1"
UID = GID = 10001
IMAGE_HEALTHCHECK = ["CMD", "cacheport", "healthcheck", "-c", "/etc/cacheport/cacheport.yaml"]


@pytest.fixture(scope="module")
def podman() -> Podman:
    reason = unavailable()
    if reason is not None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI must run the container tests, but {reason}")
        pytest.skip(reason)
    return Podman()


@pytest.fixture(scope="module")
def base(podman: Podman) -> str:
    return base_image(podman)


@pytest.fixture(scope="module")
def image(podman: Podman, base: str) -> str:
    build_image(podman, base)
    return IMAGE


@pytest.fixture(scope="module")
def redis_node() -> Iterator[ServerProcess]:
    with start_server("redis") as server:
        yield server


@pytest.fixture(scope="module")
def memcached_node() -> Iterator[ServerProcess]:
    with start_server("memcached") as server:
        yield server


class Container:
    """One ``podman run -d`` of the image; the map lives in its own mounted folder."""

    def __init__(self, podman: Podman, name: str, conf_dir: Path, admin_port: int) -> None:
        self.podman = podman
        self.name = name
        self.conf_dir = conf_dir
        self.admin_port = admin_port

    def logs(self) -> str:
        result = self.podman("logs", self.name, check=False)
        return result.stdout + result.stderr

    def exited(self) -> bool:
        """Ended (podman says ``stopping`` while a stop signal is being handled)."""
        state = self.podman("inspect", "--format", "{{.State.Status}}", self.name, check=False)
        return state.stdout.strip() in ("exited", "stopped", "")

    def wait_log(self, text: str, timeout: float = 30) -> None:
        def seen() -> bool:
            if text in self.logs():
                return True
            if self.exited() and text not in self.logs():
                raise AssertionError(f"{self.name} exited before logging {text!r}:\n"
                                     f"{self.logs()}")
            return False

        wait_until(seen, timeout, 0.1, f"{text!r} in {self.name}'s log")

    def exec(self, *command: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.podman("exec", self.name, *command, check=check, timeout=30)

    def status(self) -> dict[str, Any]:
        url = f"http://{HOST}:{self.admin_port}/status"
        with urllib.request.urlopen(url, timeout=5) as reply:
            doc: dict[str, Any] = json.loads(reply.read())
        return doc

    def write_map(self, doc: dict[str, Any], mode: int = 0o640) -> None:
        """In place (same inode), as the guide says: root:10001, readable by the group."""
        path = self.conf_dir / "cacheport.yaml"
        with open(path, "w") as f:
            f.write(yaml.safe_dump(doc, sort_keys=False))
        os.chown(path, 0, GID)
        path.chmod(mode)


class Fleet:
    """Starts containers and volumes for one test and removes them by name afterwards."""

    def __init__(self, podman: Podman, image: str, tmp: Path) -> None:
        self.podman = podman
        self.image = image
        self.tmp = tmp
        self.prefix = f"cacheport-test-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.names: list[str] = []
        self.volumes: list[str] = []

    def volume(self, suffix: str) -> str:
        name = f"{self.prefix}-{suffix}"
        self.podman("volume", "create", name)
        self.volumes.append(name)
        return name

    def start(self, suffix: str, doc: dict[str, Any], volume: str | None = None, *,
              map_mode: int = 0o640, restart: str | None = None) -> Container:
        name = f"{self.prefix}-{suffix}"
        conf_dir = self.tmp / suffix
        conf_dir.mkdir()
        os.chown(conf_dir, 0, GID)
        conf_dir.chmod(0o750)
        admin = doc.get("admin") or {}
        admin_port = int(str(admin.get("listen", "127.0.0.1:9180")).rsplit(":", 1)[1]) \
            if isinstance(admin, dict) else 0
        container = Container(self.podman, name, conf_dir, admin_port)
        container.write_map(doc, map_mode)
        options = compose_run_options(str(conf_dir), volume or self.volume(f"{suffix}-state"),
                                      ulimits=False)
        if restart is not None:  # e.g. "no": an exit code to read, not a restart loop
            options[options.index("--restart") + 1] = restart
        self.names.append(name)
        # --read-only-tmpfs=false: no tmpfs on /tmp and /run either, as Docker's --read-only
        self.podman("run", "-d", "--name", name, "--read-only-tmpfs=false", *options,
                    self.image, timeout=60)
        if map_mode & 0o040:
            container.wait_log("cacheport serving")
        return container

    def remove(self, name: str) -> None:
        self.podman("rm", "-f", "-t", "10", name, check=False, timeout=60)

    def close(self) -> None:
        for name in self.names:
            self.remove(name)
        for volume in self.volumes:
            self.podman("volume", "rm", "-f", volume, check=False)


@pytest.fixture
def fleet(podman: Podman, image: str, tmp_path: Path) -> Iterator[Fleet]:
    fleet = Fleet(podman, image, tmp_path)
    try:
        yield fleet
    finally:
        fleet.close()


@pytest.fixture(scope="module")
def served(podman: Podman, image: str, redis_node: ServerProcess,
           memcached_node: ServerProcess, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[Container]:
    """The plain map, served read-only by the documented settings, admin on a port of
    its own (not 9180)."""
    fleet = Fleet(podman, image, tmp_path_factory.mktemp("served"))
    try:
        yield fleet.start("served", {
            "admin": {"listen": f"{HOST}:{free_port()}"},
            "state_dir": "/var/lib/cacheport",
            "defaults": {"health": False},
            "listeners": [
                {"name": "redis", "listen": f"{HOST}:{free_port()}",
                 "upstream": redis_node.address, "protocol": "redis"},
                {"name": "memcached", "listen": f"{HOST}:{free_port()}",
                 "upstream": memcached_node.address, "protocol": "memcached"},
            ]})
    finally:
        fleet.close()


def listener_port(container: Container, name: str) -> int:
    for listener in container.status()["listeners"]:
        if listener["name"] == name:
            return int(listener["listen"].rsplit(":", 1)[1])
    raise AssertionError(f"no listener {name} in /status")


def redis_cli(port: int, *command: str) -> str:
    result = subprocess.run([require_binary("redis-cli"), "-h", HOST, "-p", str(port), *command],
                            capture_output=True, text=True, timeout=10)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


# -- serving ---------------------------------------------------------------------------


def test_redis_and_memcached_through_the_container_as_uid_10001_on_the_engine(
        served: Container, podman: Podman) -> None:
    redis_port = listener_port(served, "redis")
    assert redis_cli(redis_port, "SET", "container:k", "v1") == "OK"
    assert redis_cli(redis_port, "GET", "container:k") == "v1"
    client = MemcacheClient((HOST, listener_port(served, "memcached")), connect_timeout=5,
                            timeout=5)
    try:
        client.set("container:k", b"v2")
        assert client.get("container:k") == b"v2"
    finally:
        client.close()

    assert served.exec("id", "-u").stdout.strip() == str(UID)
    assert served.exec("id", "-g").stdout.strip() == str(GID)
    assert served.exec("sh", "-c", "ulimit -n").stdout.strip() == str(podman.nofile)
    served.exec("python", "-I", "-c", "import proxy.relay._engine")
    log = served.logs()
    for name in ("redis", "memcached"):
        assert f"listener {name} " in log and "started; relay engine" in log, log
    assert "not built" not in log
    assert {lst["name"]: lst["relay"] for lst in served.status()["listeners"]} == {
        "redis": "engine", "memcached": "engine"}


def test_read_only_root_with_the_state_volume_the_one_place_it_writes(
        served: Container, podman: Podman) -> None:
    """The container above serves with ``--read-only`` and no tmpfs at all."""
    inspect = podman("inspect", "--format", "{{.HostConfig.ReadonlyRootfs}}", served.name)
    assert inspect.stdout.strip() == "true"
    for path in ("/opt/cacheport/probe", "/tmp/probe", "/etc/cacheport/probe"):
        denied = served.exec("touch", path, check=False)
        assert denied.returncode != 0 and "Read-only file system" in denied.stderr, path
    served.exec("touch", "/var/lib/cacheport/probe")
    served.exec("rm", "/var/lib/cacheport/probe")


def test_image_is_its_base_plus_a_small_venv_without_compiler_pip_or_tests(
        served: Container, podman: Podman, base: str) -> None:
    absent = served.exec("sh", "-c", "command -v gcc cc; ls /src /opt/cacheport/bin/pip "
                         "/root/.cache 2>/dev/null; python -I -c 'import pip'", check=False)
    assert absent.stdout.strip() == "" and "No module named 'pip'" in absent.stderr

    def size(name: str) -> int:
        return int(podman("image", "inspect", "--format", "{{.Size}}", name).stdout)

    added = size(IMAGE) - size(base)
    print(f"image {size(IMAGE) / 1e6:.0f} MB = base {size(base) / 1e6:.0f} MB "
          f"+ {added / 1e6:.1f} MB")  # the figures docs/container.md reports
    assert added < 30e6  # the venv: uvloop, pydantic-core, redis-py, the engine


# -- health check ----------------------------------------------------------------------


def test_image_healthcheck_asks_the_maps_admin_port_and_fails_when_it_stops(
        served: Container, podman: Podman) -> None:
    config = podman("inspect", "--format", "{{json .Config.Healthcheck}}", served.name).stdout
    assert json.loads(config)["Test"] == IMAGE_HEALTHCHECK
    assert served.admin_port != 9180

    healthy = podman("healthcheck", "run", served.name, check=False, timeout=30)
    assert healthy.returncode == 0, healthy.stdout + healthy.stderr
    # SIGSTOP from the host: the process holds its sockets but answers nothing.
    podman("kill", "--signal", "STOP", served.name)
    try:
        stopped = podman("healthcheck", "run", served.name, check=False, timeout=30)
        assert stopped.returncode != 0
        assert "unhealthy" in stopped.stdout + stopped.stderr
    finally:
        podman("kill", "--signal", "CONT", served.name)
    again = podman("healthcheck", "run", served.name, check=False, timeout=30)
    assert again.returncode == 0, again.stdout + again.stderr


# -- signals ---------------------------------------------------------------------------


def test_sighup_reloads_an_edited_map_with_a_listener_added(
        fleet: Fleet, redis_node: ServerProcess, memcached_node: ServerProcess) -> None:
    redis_port, memcached_port = free_port(), free_port()
    doc: dict[str, Any] = {
        "admin": {"listen": f"{HOST}:{free_port()}"},
        "defaults": {"health": False},
        "listeners": [{"name": "redis", "listen": f"{HOST}:{redis_port}",
                       "upstream": redis_node.address, "protocol": "redis"}]}
    container = fleet.start("reload", doc)
    assert redis_cli(redis_port, "PING") == "PONG"

    doc["listeners"].append({"name": "memcached", "listen": f"{HOST}:{memcached_port}",
                             "upstream": memcached_node.address, "protocol": "memcached"})
    container.write_map(doc)
    fleet.podman("kill", "--signal", "HUP", container.name)
    container.wait_log("reloaded /etc/cacheport/cacheport.yaml")
    client = MemcacheClient((HOST, memcached_port), connect_timeout=5, timeout=5)
    try:
        client.set("reload:k", b"added")
        assert client.get("reload:k") == b"added"
    finally:
        client.close()
    assert redis_cli(redis_port, "PING") == "PONG"


def test_sigterm_drains_a_held_connection_and_exits_0_within_the_stop_timeout(
        fleet: Fleet, redis_node: ServerProcess) -> None:
    port = free_port()
    container = fleet.start("drain", {
        "admin": "off", "drain_timeout": "20s", "defaults": {"health": False},
        "listeners": [{"name": "redis", "listen": f"{HOST}:{port}",
                       "upstream": redis_node.address, "protocol": "redis"}]})
    stop_timeout = int(compose_run_options()[compose_run_options().index("--stop-timeout") + 1])
    assert stop_timeout > 20  # compose's stop_grace_period covers the drain

    # admin: off -- the image's health check has nothing to ask, passes, and says so
    healthy = fleet.podman("healthcheck", "run", container.name, check=False, timeout=30)
    assert healthy.returncode == 0, healthy.stdout + healthy.stderr

    held = socket.create_connection((HOST, port), timeout=5)
    stopper: subprocess.Popen[str] | None = None
    try:
        held.sendall(b"PING\r\n")
        assert held.recv(64) == b"+PONG\r\n"
        started = time.monotonic()
        stopper = subprocess.Popen(["podman", "stop", container.name], env=fleet.podman.env,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        container.wait_log("draining 1 connection(s)")
        held.sendall(b"PING\r\n")  # still served while draining
        assert held.recv(64) == b"+PONG\r\n"
        held.close()
        stopper.communicate(timeout=stop_timeout + 10)
        elapsed = time.monotonic() - started
    finally:
        held.close()
        if stopper is not None and stopper.poll() is None:
            stopper.kill()
            stopper.communicate(timeout=5)
    exit_code = fleet.podman("inspect", "--format", "{{.State.ExitCode}}", container.name)
    assert exit_code.stdout.strip() == "0", container.logs()
    assert elapsed < stop_timeout
    assert "1 connection(s) drained, 0 cut" in container.logs()


def test_a_map_uid_10001_cannot_read_stops_the_container_saying_so(
        fleet: Fleet, redis_node: ServerProcess) -> None:
    """The guide's warning: a 0600 root-owned map is unreadable for the image's user."""
    container = fleet.start("unreadable", {"listeners": [
        {"name": "redis", "listen": f"{HOST}:{free_port()}", "upstream": redis_node.address}]},
        map_mode=0o600, restart="no")
    wait_until(container.exited, 30, 0.2, "the container to exit")
    code = fleet.podman("inspect", "--format", "{{.State.ExitCode}}", container.name)
    assert code.stdout.strip() == "2", container.logs()
    assert "/etc/cacheport/cacheport.yaml: cannot read: Permission denied" in container.logs()


# -- cluster port assignments across container restarts -------------------------------


@pytest.fixture(scope="module")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[ServerProcess]]:
    """A real 3-master Redis Cluster on loopback."""
    with three_masters(tmp_path_factory.mktemp("cluster")) as nodes:
        yield nodes


def _node_ports(container: Container) -> dict[str, int]:
    def assigned() -> dict[str, int] | None:
        clusters = container.status().get("clusters") or []
        nodes = clusters[0]["nodes"] if clusters else []
        if len(nodes) == 3 and all(n.get("port") and n.get("listening") for n in nodes):
            return {n["id"]: int(n["port"]) for n in nodes}
        return None

    ports: dict[str, int] = wait_until(assigned, 30, 0.2, "3 cluster nodes with ports")
    return ports


def test_cluster_node_ports_survive_removing_the_container_with_the_same_volume(
        fleet: Fleet, redis_cluster: list[ServerProcess]) -> None:
    base = free_range(9)
    doc = {"admin": {"listen": f"{HOST}:{free_port()}"}, "state_dir": "/var/lib/cacheport",
           "defaults": {"health": False}, "listeners": [],
           "clusters": [{"name": "rc", "engine": "redis-cluster",
                         "seed": f"{HOST}:{redis_cluster[0].port}", "announce": HOST,
                         "listen": HOST, "ports": f"{base + 1}-{base + 8}",
                         "seed_port": base, "refresh": "1h"}]}
    volume = fleet.volume("cluster-state")
    first = fleet.start("cluster1", doc, volume=volume)
    ports = _node_ports(first)
    assert redis_cli(base, "-c", "SET", "container:cluster", "x") == "OK"
    assert "in memory only" not in first.logs()
    fleet.remove(first.name)

    mount = fleet.podman("volume", "inspect", "--format", "{{.Mountpoint}}", volume)
    state = Path(mount.stdout.strip()) / "cacheport-state.json"
    stored = json.loads(state.read_text())
    assert stored["clusters"]["rc"]["ports"]["assigned"] == ports
    # Swap two nodes' ports in the stored book (as if they had joined in another order):
    # a fresh start would hand ports out in node-id order, so only the file can say this.
    a, b = sorted(ports)[:2]
    swapped = {**ports, a: ports[b], b: ports[a]}
    stored["clusters"]["rc"]["ports"]["assigned"] = swapped
    owner = state.stat()
    state.write_text(json.dumps(stored))
    os.chown(state, owner.st_uid, owner.st_gid)

    second = fleet.start("cluster2", doc, volume=volume)
    assert _node_ports(second) == swapped
    assert "in memory only" not in second.logs()


def test_engine_settings_come_from_the_tests_own_containers_conf(podman: Podman) -> None:
    """The engine settings came from this module's own containers.conf."""
    info = json.loads(podman("info", "--format", "json").stdout)
    assert info["host"]["ociRuntime"]["name"] == "runc"
    assert info["host"]["cgroupManager"] == "cgroupfs"
    assert info["host"]["eventLogger"] == "file"
