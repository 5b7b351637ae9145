"""Cluster-aware clients in other languages through ``clusters:``: Ruby's redis gem, PHP's
phpredis (``RedisCluster``) and node-redis (``createCluster``), as Debian ships them,
against a real 3-master Redis Cluster on loopback.

Each client is given only the seed port. It learns the slot map from CLUSTER SLOTS (as
cacheport rewrites it), writes keys across every slot range and reads them back. The
nodes are reachable on loopback too, so a client that ignored the rewritten addresses
would still succeed: every node listener must have accepted a client connection.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from proxy.relay.engine import native_available
from tests.cluster_helpers import redis_cluster_entry, three_masters
from tests.support import ProxyThread, ServerProcess, make_config, wait_until

pytestmark = pytest.mark.timeout(90)

HOST = "127.0.0.1"
KEYS = 300  # spread over the 3 masters' slots
NODE_PATH = "/usr/share/nodejs"  # where Debian's node-* packages live

RUBY = """
require "redis"
r = Redis.new(cluster: ["redis://127.0.0.1:#{ARGV[0]}"], timeout: 5)
n = ARGV[1].to_i
n.times { |i| r.set("rb:#{i}", "v#{i}") }
bad = (0...n).count { |i| r.get("rb:#{i}") != "v#{i}" }
puts "ok #{n - bad} bad #{bad}"
exit(bad == 0 ? 0 : 1)
"""

PHP = """<?php
$c = new RedisCluster(NULL, ["127.0.0.1:" . $argv[1]], 5, 5);
$n = intval($argv[2]);
for ($i = 0; $i < $n; $i++) { $c->set("php:$i", "v$i"); }
$bad = 0;
for ($i = 0; $i < $n; $i++) { if ($c->get("php:$i") !== "v$i") { $bad++; } }
echo "ok " . ($n - $bad) . " bad $bad\\n";
exit($bad == 0 ? 0 : 1);
"""

NODE = """
const { createCluster } = require("redis");
(async () => {
  const [port, n] = [process.argv[2], Number(process.argv[3])];
  const c = createCluster({ rootNodes: [{ url: `redis://127.0.0.1:${port}` }] });
  c.on("error", (e) => console.error("cluster error:", e.message));
  await c.connect();
  for (let i = 0; i < n; i++) await c.set(`js:${i}`, `v${i}`);
  let bad = 0;
  for (let i = 0; i < n; i++) if ((await c.get(`js:${i}`)) !== `v${i}`) bad++;
  console.log(`ok ${n - bad} bad ${bad}`);
  await c.quit();
  process.exit(bad === 0 ? 0 : 1);
})().catch((e) => { console.error("failed:", e); process.exit(2); });
"""

# name: (program, file suffix, source, a command that fails without the library)
CLIENTS: dict[str, tuple[str, str, str, list[str]]] = {
    "ruby": ("ruby", ".rb", RUBY, ["ruby", "-e", 'require "redis"']),
    "php": ("php", ".php", PHP, ["php", "-r", 'exit(class_exists("RedisCluster") ? 0 : 1);']),
    "node": ("node", ".js", NODE, ["node", "-e", 'require("redis")']),
}
RELAYS = ["python", pytest.param("native", marks=pytest.mark.skipif(
    not native_available(), reason="the engine is not built here"))]


def _env() -> dict[str, str]:
    return {**os.environ, "NODE_PATH": NODE_PATH}


def _require(client: str) -> str:
    """The client's program; skip without it, fail under CI=true (bootstrap installs it)."""
    program, _suffix, _source, probe = CLIENTS[client]
    found = shutil.which(program)
    if found is not None and subprocess.run(probe, capture_output=True, env=_env(),
                                            timeout=30).returncode == 0:
        return found
    message = (f"the {client} Redis Cluster client is not installed (Debian packages "
               "ruby-redis, php-cli php-redis, node-redis)")
    if os.environ.get("CI") == "true":
        pytest.fail(message + " (CI must have it: scripts/bootstrap.sh installs it)")
    pytest.skip(message)


@pytest.fixture(scope="module")
def masters(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[ServerProcess]]:
    with three_masters(tmp_path_factory.mktemp("cluster3")) as nodes:
        yield nodes


@pytest.mark.parametrize("relay", RELAYS)
@pytest.mark.parametrize("client", sorted(CLIENTS))
def test_a_cluster_client_in_another_language_works_through_the_seed_port_alone(
        client: str, relay: str, masters: list[ServerProcess], tmp_path: Path) -> None:
    program = _require(client)
    _name, suffix, source, _probe = CLIENTS[client]
    script = tmp_path / f"client{suffix}"
    script.write_text(source)
    cluster = redis_cluster_entry(masters[0].address, 6, relay=relay)
    proxy = ProxyThread(make_config([], clusters=[cluster],
                                    state_dir=str(tmp_path / "state"))).start()
    try:
        nodes = [f"rc:{entry['port']}" for entry in
                 proxy.call(proxy.server.cluster_status)[0]["nodes"]]
        assert len(nodes) == 3
        wait_until(lambda: all(name in proxy.server.listeners for name in nodes), 10)
        result = subprocess.run([program, str(script), str(cluster["seed_port"]), str(KEYS)],
                                capture_output=True, text=True, env=_env(), timeout=60)
        assert result.returncode == 0, result.stdout + result.stderr
        assert result.stdout.split() == ["ok", str(KEYS), "bad", "0"], result.stdout
        accepted = {name: proxy.server.listeners[name].stats.accepted for name in nodes}
        assert all(count > 0 for count in accepted.values()), accepted
    finally:
        proxy.stop()
