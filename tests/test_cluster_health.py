"""A cluster's node listeners are health-checked like the port map's: a node that dies goes
DOWN in ``/status`` and ``cacheport_upstream_up``, so the node-down alert fires for it too."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.cluster_helpers import redis_cluster_entry, start_lone_node
from tests.healthkit import metrics, sample, wait_health
from tests.support import ProxyThread, free_port, make_config, wait_until

pytestmark = pytest.mark.timeout(45)

# fall 2: one check a loaded machine lets overrun does not flip the state.
FAST = {"interval": "200ms", "timeout": "200ms", "rise": 1, "fall": 2}


def _up(proxy: ProxyThread, listener: str, upstream: str) -> float:
    return sample(metrics(proxy), "cacheport_upstream_up", listener=listener, upstream=upstream)


def test_a_cluster_node_listener_is_checked_and_goes_down_with_its_node(tmp_path: Path) -> None:
    node = start_lone_node(tmp_path)
    try:
        cluster = redis_cluster_entry(node.address, 2, health=FAST)
        config = make_config([], clusters=[cluster], state_dir=str(tmp_path / "state"),
                             admin={"listen": f"127.0.0.1:{free_port()}"})
        proxy = ProxyThread(config).start()
        try:
            (entry,) = proxy.call(proxy.server.cluster_status)[0]["nodes"]
            name = f"rc:{entry['port']}"
            wait_until(lambda: name in proxy.server.listeners, 10)
            for listener in ("rc:seed", name):
                wait_health(proxy, listener, node.address, "up", 10)
            wait_until(lambda: _up(proxy, name, node.address) == 1, 10)
            node.stop()
            for listener in ("rc:seed", name):
                wait_health(proxy, listener, node.address, "down", 10)
            assert _up(proxy, name, node.address) == 0  # a stopped node stays DOWN
            # A reload that drops the cluster drops its checks too.
            admin = {"listen": str(config.admin.listen)} if config.admin else False
            unchecked = {"name": "keep", "listen": "127.0.0.1:0", "upstream": node.address}
            proxy.call(lambda: proxy.server.reload(make_config(
                [unchecked], state_dir=str(tmp_path / "state"), admin=admin)))
            monitor = proxy.server.monitor
            assert monitor is not None
            assert proxy.call(lambda: [t.key for t in monitor]) == []
        finally:
            proxy.stop()
    finally:
        node.stop()
