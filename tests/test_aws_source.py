"""The ``aws:`` source: a stubbed ElastiCache API read on demand by a running cacheport,
a real redis-server behind the replication group it describes; caches appearing and
disappearing become reloads, and an unreadable or invalid answer changes nothing.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from proxy.aws import translate
from proxy.aws.source import AwsSource
from proxy.config import load_config
from proxy.runtime import Reloader
from tests.cluster_helpers import free_range
from tests.support import ProxyThread, ServerProcess, start_server

boto3 = pytest.importorskip("boto3")
Stubber = pytest.importorskip("botocore.stub").Stubber

pytestmark = pytest.mark.timeout(40)
REGION = "eu-west-1"


def _group(ident: str, port: int) -> dict[str, Any]:
    return {"ReplicationGroupId": ident, "Status": "available", "ClusterEnabled": False,
            "ARN": f"arn:aws:elasticache:{REGION}:123456789012:replicationgroup:{ident}",
            "NodeGroups": [{"NodeGroupId": "0001", "Status": "available",
                            "PrimaryEndpoint": {"Address": "127.0.0.1", "Port": port}}]}


def test_a_later_read_keeps_every_block_and_adds_above() -> None:
    first = translate([_group("m", 6379)], [], [], first_port=30000)
    second = translate([_group("a", 6379), _group("m", 6379)], [], [], first_port=30000,
                       keep=first.blocks)
    by_name = {c.name: c for c in second.clusters}
    assert by_name["m"].primary_port == 30000  # "a" sorts first, but "m" keeps its ports
    assert by_name["a"].primary_port == 30020


@pytest.fixture
def node() -> Iterator[ServerProcess]:
    with start_server("redis") as server:
        yield server


def test_caches_that_appear_and_disappear_are_reloaded_and_bad_answers_change_nothing(
        node: ServerProcess, tmp_path: Path) -> None:
    base = free_range(40)
    port_map = tmp_path / "map.yaml"
    port_map.write_text(
        "defaults: {allow: [127.0.0.1/32], health: off}\n"
        "admin: off\n"
        f"state_dir: {tmp_path}\n"
        f"aws: {{region: {REGION}, announce: 127.0.0.1, listen: 127.0.0.1, "
        f"first_port: {base}, interval: 1h}}\n"
        # A port the API's second group wants whatever base is: its 14-port block starts
        # at base+14 rounded up to a multiple of 10 (base+14..base+23), so it holds base+25.
        f"listeners:\n  - {{name: fixed, listen: '127.0.0.1:{base + 25}', "
        f"upstream: '127.0.0.1:{node.port}'}}\n")
    api = boto3.client("elasticache", region_name=REGION, aws_access_key_id="testing",
                       aws_secret_access_key="testing")
    stub = Stubber(api)
    stub.activate()
    config = load_config(str(port_map))
    assert config.aws is not None
    proxy = ProxyThread(config).start()
    try:
        reloader = Reloader(proxy.server, str(port_map))
        source = AwsSource(config.aws, api=lambda: api)
        reloader.extend = source.extend

        def answer(*groups: dict[str, Any]) -> None:
            stub.add_response("describe_replication_groups",
                              {"ReplicationGroups": list(groups)})
            stub.add_response("describe_cache_clusters", {"CacheClusters": []},
                              {"ShowCacheNodeInfo": True})
            stub.add_response("describe_serverless_caches", {"ServerlessCaches": []})

        def poll() -> bool:
            return bool(proxy.call(lambda: source.poll_once(reloader.reload), timeout=20))

        answer(_group("sessions", node.port))
        assert poll()
        assert list(proxy.server.clusters) == ["sessions"]
        with redis.Redis(port=base, socket_timeout=3) as r:  # primary_port
            assert int(r.config_get("port")["port"]) == node.port
        reloads = proxy.server.reloads

        answer(_group("sessions", node.port))
        assert not poll() and proxy.server.reloads == reloads  # the same: no reload

        answer(_group("sessions", node.port), _group("tokens", node.port))
        assert not poll()  # tokens' block collides with the file's listener 'fixed'
        assert list(proxy.server.clusters) == ["sessions"]
        assert "fixed" in proxy.server.listeners

        stub.add_client_error("describe_replication_groups",
                              service_error_code="AccessDenied", http_status_code=403)
        assert not poll() and source.read_failures == 1
        assert "elasticache:DescribeReplicationGroups" in (source.last_error or "")
        assert list(proxy.server.clusters) == ["sessions"]

        answer()
        assert poll()
        assert proxy.server.clusters == {}
        assert "fixed" in proxy.server.listeners
        stub.assert_no_pending_responses()
    finally:
        proxy.stop()
        stub.deactivate()


@pytest.mark.parametrize(("text", "expected"), [
    ("aws: {region: us-east-1, announce: 10.0.0.1, tgas: {a: b}}",
     "aws: unknown field 'tgas' (did you mean 'tags'?)"),
    ("aws: {announce: 10.0.0.1}", "aws: missing required field 'region'"),
    ("aws: {region: us east, announce: 10.0.0.1}", "aws: field 'region': expected one word"),
])
def test_aws_block_mistakes_are_located(tmp_path: Path, text: str, expected: str) -> None:
    from proxy.config import ConfigError

    path = tmp_path / "map.yaml"
    path.write_text(text + "\n")
    with pytest.raises(ConfigError, match=re.escape(expected)):
        load_config(str(path))


def test_a_port_map_may_hold_only_an_aws_block(tmp_path: Path) -> None:
    path = tmp_path / "map.yaml"
    path.write_text("aws: {region: us-east-1, announce: 10.0.0.1, tags: {team: web}}\n")
    config = load_config(str(path))
    assert config.aws is not None and config.aws.tags == (("team", "web"),)
    assert config.aws.interval == 300.0
