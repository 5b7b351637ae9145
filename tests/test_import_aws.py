"""``cacheport import-aws`` without AWS: moto for what it models (replication groups with
node groups), botocore's Stubber with responses in the documented shapes for what it does
not (memcached node lists, serverless caches); the map it writes passes ``cacheport
check``; and the core runs without boto3 at all.
"""

from __future__ import annotations

import argparse
import itertools
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from proxy.aws import read_account, run_import, translate
from proxy.aws.fetch import INSTALL_HINT
from proxy.cli import main
from proxy.config import load_config
from tests.support import cacheport_env

boto3 = pytest.importorskip("boto3")
Stubber = pytest.importorskip("botocore.stub").Stubber

pytestmark = pytest.mark.timeout(60)
REGION = "eu-west-1"
ARN = f"arn:aws:elasticache:{REGION}:123456789012"


def _client() -> Any:
    return boto3.client("elasticache", region_name=REGION, aws_access_key_id="testing",
                        aws_secret_access_key="testing")


def _args(tmp_path: Path, *extra: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    from proxy.aws import register

    register(sub)
    return parser.parse_args(["import-aws", "--announce", "nat.example.com", "--allow",
                              "10.0.0.0/8", "-o", str(tmp_path / "aws.yaml"), *extra])


# -- moto: replication groups -------------------------------------------------------------


@pytest.fixture
def moto_groups(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    moto = pytest.importorskip("moto")
    for key, value in (("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing"),
                       ("AWS_DEFAULT_REGION", REGION)):
        monkeypatch.setenv(key, value)
    with moto.mock_aws():
        api = boto3.client("elasticache", region_name=REGION)
        api.create_replication_group(
            ReplicationGroupId="orders", ReplicationGroupDescription="cluster mode on",
            Engine="redis", CacheNodeType="cache.r7g.large", ClusterMode="enabled",
            NumNodeGroups=3, ReplicasPerNodeGroup=1, TransitEncryptionEnabled=True)
        api.create_replication_group(
            ReplicationGroupId="sessions", ReplicationGroupDescription="cluster mode off",
            Engine="redis", CacheNodeType="cache.t4g.small", NumCacheClusters=3)
        yield api


def test_moto_replication_groups_become_cluster_entries(moto_groups: Any) -> None:
    account = read_account(moto_groups, serverless=False)
    result = translate(account.groups, [], [], first_port=30000)
    by_name = {c.name: c for c in result.clusters}
    orders, sessions = by_name["orders"], by_name["sessions"]
    assert orders.engine == "redis-cluster" and orders.upstream_tls
    assert orders.seed_port == 30000 and orders.ports[0] == 30001
    assert sessions.engine == "redis-replication" and not sessions.upstream_tls
    assert sessions.primary_port is not None and sessions.reader_port is not None
    assert sessions.primary_port > orders.ports[1]  # ranges never overlap
    assert "sessions" in sessions.seed.host  # the group's primary endpoint


def test_moto_import_writes_a_map_that_check_accepts(moto_groups: Any, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    args = _args(tmp_path, "--region", REGION, "--no-serverless")
    assert run_import(args, moto_groups) == 0
    assert main(["check", str(tmp_path / "aws.yaml")]) == 0
    assert "cluster orders: redis-cluster" in capsys.readouterr().out


# -- Stubber: one of each shape -----------------------------------------------------------


def _ep(address: str, port: int) -> dict[str, Any]:
    return {"Address": address, "Port": port}


GROUP_ON = {
    "ReplicationGroupId": "orders", "Description": "cluster mode on", "Status": "available",
    "MemberClusters": ["orders-0001-001", "orders-0001-002"],
    "NodeGroups": [{"NodeGroupId": "0001", "Status": "available", "Slots": "0-16383",
                    "NodeGroupMembers": [{"CacheClusterId": "orders-0001-001",
                                          "CacheNodeId": "0001"},
                                         {"CacheClusterId": "orders-0001-002",
                                          "CacheNodeId": "0001"}]}],
    "ConfigurationEndpoint": _ep("clustercfg.orders.abc123.euw1.cache.amazonaws.com", 6379),
    "ClusterEnabled": True, "CacheNodeType": "cache.r7g.large", "AuthTokenEnabled": True,
    "TransitEncryptionEnabled": True, "ARN": f"{ARN}:replicationgroup:orders",
    "Engine": "valkey", "ClusterMode": "enabled",
}
GROUP_OFF = {
    "ReplicationGroupId": "sessions", "Description": "cluster mode off", "Status": "available",
    "MemberClusters": ["sessions-001", "sessions-002"],
    "NodeGroups": [{"NodeGroupId": "0001", "Status": "available",
                    "PrimaryEndpoint": _ep("sessions.abc123.ng.0001.euw1.cache.amazonaws.com",
                                           6379),
                    "ReaderEndpoint": _ep("sessions-ro.abc123.ng.0001.euw1.cache.amazonaws.com",
                                          6379),
                    "NodeGroupMembers": [
                        {"CacheClusterId": "sessions-001", "CacheNodeId": "0001",
                         "ReadEndpoint": _ep("sessions-001.abc123.0001.euw1.cache.amazonaws.com",
                                             6379), "CurrentRole": "primary"},
                        {"CacheClusterId": "sessions-002", "CacheNodeId": "0001",
                         "ReadEndpoint": _ep("sessions-002.abc123.0001.euw1.cache.amazonaws.com",
                                             6379), "CurrentRole": "replica"}]}],
    "ClusterEnabled": False, "CacheNodeType": "cache.t4g.small",
    "TransitEncryptionEnabled": False, "ARN": f"{ARN}:replicationgroup:sessions",
    "Engine": "redis", "ClusterMode": "disabled",
}
MEMCACHED = {
    "CacheClusterId": "catalog", "Engine": "memcached", "EngineVersion": "1.6.22",
    "CacheClusterStatus": "available", "NumCacheNodes": 2, "CacheNodeType": "cache.m7g.large",
    "ConfigurationEndpoint": _ep("catalog.abc123.cfg.euw1.cache.amazonaws.com", 11211),
    "CacheNodes": [{"CacheNodeId": f"000{i}", "CacheNodeStatus": "available",
                    "Endpoint": _ep(f"catalog.abc123.000{i}.euw1.cache.amazonaws.com", 11211)}
                   for i in (1, 2)],
    "TransitEncryptionEnabled": True, "ARN": f"{ARN}:cluster:catalog",
}
MEMBER = {"CacheClusterId": "sessions-001", "Engine": "redis", "EngineVersion": "7.1.0",
          "CacheClusterStatus": "available", "NumCacheNodes": 1,
          "ReplicationGroupId": "sessions", "ARN": f"{ARN}:cluster:sessions-001"}
STANDALONE = {
    "CacheClusterId": "legacy", "Engine": "redis", "EngineVersion": "6.2.6",
    "CacheClusterStatus": "available", "NumCacheNodes": 1,
    "CacheNodes": [{"CacheNodeId": "0001", "CacheNodeStatus": "available",
                    "Endpoint": _ep("legacy.abc123.0001.euw1.cache.amazonaws.com", 6379)}],
    "ARN": f"{ARN}:cluster:legacy",
}
SERVERLESS_REDIS = {
    "ServerlessCacheName": "carts", "Status": "available", "Engine": "valkey",
    "MajorEngineVersion": "8", "FullEngineVersion": "8.0",
    "Endpoint": _ep("carts-abc123.serverless.euw1.cache.amazonaws.com", 6379),
    "ReaderEndpoint": _ep("carts-abc123.serverless.euw1.cache.amazonaws.com", 6380),
    "ARN": f"{ARN}:serverlesscache:carts",
}
SERVERLESS_MC = {
    "ServerlessCacheName": "pages", "Status": "available", "Engine": "memcached",
    "MajorEngineVersion": "1.6",
    "Endpoint": _ep("pages-abc123.serverless.euw1.cache.amazonaws.com", 11211),
    "ARN": f"{ARN}:serverlesscache:pages",
}
SERVERLESS_NEW = {"ServerlessCacheName": "fresh", "Status": "creating", "Engine": "redis",
                  "ARN": f"{ARN}:serverlesscache:fresh"}


def _stub_account(stub: Any, groups: list[dict[str, Any]] | None = None) -> None:
    stub.add_response("describe_replication_groups",
                      {"ReplicationGroups": [GROUP_ON, GROUP_OFF] if groups is None
                       else groups})
    stub.add_response("describe_cache_clusters",
                      {"CacheClusters": [MEMCACHED, MEMBER, STANDALONE]},
                      {"ShowCacheNodeInfo": True})
    stub.add_response("describe_serverless_caches",
                      {"ServerlessCaches": [SERVERLESS_REDIS, SERVERLESS_MC, SERVERLESS_NEW]})


def test_one_of_each_shape_becomes_a_map_that_check_accepts(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    api = _client()
    with Stubber(api) as stub:
        _stub_account(stub)
        assert run_import(_args(tmp_path, "--region", REGION), api) == 0
        stub.assert_no_pending_responses()
    err = capsys.readouterr().err
    path = tmp_path / "aws.yaml"
    text = path.read_text()
    config = load_config(str(path))
    clusters = {c.name: c for c in config.clusters}
    assert {n: c.engine for n, c in clusters.items()} == {
        "orders": "redis-cluster", "sessions": "redis-replication", "catalog": "memcached",
        "carts": "redis-cluster"}
    assert clusters["orders"].template.upstream_tls is not None
    assert clusters["sessions"].template.upstream_tls is None
    assert clusters["catalog"].template.upstream_tls is not None  # in-transit encryption
    assert clusters["carts"].template.upstream_tls is not None  # serverless: TLS only
    assert clusters["sessions"].primary_port and clusters["sessions"].reader_port
    listeners = {lc.name: lc for lc in config.listeners}
    assert listeners["legacy"].protocol == "redis"
    assert listeners["pages"].protocol == "memcached" and listeners["pages"].upstream_tls
    used = [a.port for c in config.clusters for a in c.addresses()] + \
        [lc.listen.port for lc in config.listeners]
    assert len(used) == len(set(used))  # no port twice
    spans = sorted((min(a.port for a in c.addresses()), max(a.port for a in c.addresses()))
                   for c in config.clusters)
    assert all(a[1] < b[0] for a, b in itertools.pairwise(spans))
    # Each entry names its source; what was not translated is listed, not dropped.
    assert "# from replication group orders: valkey, cluster mode enabled" in text
    assert f"{ARN}:serverlesscache:carts" in text
    assert "serverless cache fresh" in text and "no endpoint yet" in err
    assert "reader endpoint" in text and "6380" in text
    assert "member of replication group sessions" in text
    assert "AUTH token enabled" in text and "password_env: CACHEPORT_ORDERS_PASSWORD" in text
    assert config.listeners[0].allow is not None
    assert str(config.listeners[0].allow[0]) == "10.0.0.0/8"
    assert main(["check", str(path)]) == 0


def test_filter_by_tag_asks_list_tags_and_keeps_matches(tmp_path: Path) -> None:
    api = _client()
    with Stubber(api) as stub:
        stub.add_response("describe_replication_groups", {"ReplicationGroups": [GROUP_OFF]})
        stub.add_response("describe_cache_clusters", {"CacheClusters": [MEMCACHED]},
                          {"ShowCacheNodeInfo": True})
        stub.add_response("describe_serverless_caches", {"ServerlessCaches": []})
        stub.add_response("list_tags_for_resource", {"TagList": [{"Key": "team",
                                                                  "Value": "web"}]},
                          {"ResourceName": GROUP_OFF["ARN"]})
        stub.add_response("list_tags_for_resource", {"TagList": []},
                          {"ResourceName": MEMCACHED["ARN"]})
        assert run_import(_args(tmp_path, "--tag", "team=web"), api) == 0
    config = load_config(str(tmp_path / "aws.yaml"))
    assert [c.name for c in config.clusters] == ["sessions"]


def test_filter_by_id_keeps_that_cache_only(tmp_path: Path) -> None:
    api = _client()
    with Stubber(api) as stub:
        _stub_account(stub)
        assert run_import(_args(tmp_path, "--id", "catalog"), api) == 0
    assert [c.name for c in load_config(str(tmp_path / "aws.yaml")).clusters] == ["catalog"]


def test_access_denied_names_the_missing_permission(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    api = _client()
    with Stubber(api) as stub:
        stub.add_response("describe_replication_groups", {"ReplicationGroups": []})
        stub.add_client_error("describe_cache_clusters", service_error_code="AccessDenied",
                              service_message="User: arn:aws:iam::1:user/x is not authorized",
                              http_status_code=403)
        assert run_import(_args(tmp_path), api) == 3
    err = capsys.readouterr().err
    assert "elasticache:DescribeCacheClusters" in err
    assert not (tmp_path / "aws.yaml").exists()


def test_nothing_translatable_writes_nothing(tmp_path: Path) -> None:
    api = _client()
    with Stubber(api) as stub:
        stub.add_response("describe_replication_groups", {"ReplicationGroups": []})
        stub.add_response("describe_cache_clusters", {"CacheClusters": [MEMBER]},
                          {"ShowCacheNodeInfo": True})
        stub.add_response("describe_serverless_caches", {"ServerlessCaches": [SERVERLESS_NEW]})
        assert run_import(_args(tmp_path), api) == 2
    assert not (tmp_path / "aws.yaml").exists()


# -- the extra is optional ----------------------------------------------------------------


def test_the_core_runs_without_boto3(tmp_path: Path) -> None:
    port_map = tmp_path / "plain.yaml"
    port_map.write_text("listeners:\n  - {name: a, listen: '127.0.0.1:0', "
                        "upstream: '127.0.0.1:6379', protocol: redis}\n")
    # boto3 and botocore made unimportable, as in an install without the extra.
    script = textwrap.dedent(f"""
        import sys
        sys.modules["boto3"] = None
        sys.modules["botocore"] = None
        import proxy.cli, proxy.server, proxy.runtime, proxy.aws
        assert proxy.cli.main(["check", {str(port_map)!r}]) == 0
        code = proxy.cli.main(["import-aws", "--region", "eu-west-1", "--announce", "h",
                               "--allow", "10.0.0.0/8"])
        assert code == 3, code
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env=cacheport_env(), timeout=30)
    assert done.returncode == 0, done.stderr
    assert INSTALL_HINT in done.stderr


def test_no_core_module_imports_boto3_at_import_time() -> None:
    script = ("import sys, proxy.cli, proxy.server, proxy.aws; "
              "print(sorted(m for m in sys.modules if m.split('.')[0] in "
              "('boto3', 'botocore')))")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env=cacheport_env(), timeout=30)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
