"""The rules in deploy/prometheus and the dashboard in deploy/grafana against a real Prometheus.

::

    memcached, TLS redis-server, a memcached cluster (configuration endpoint)
        ^
    cacheport (workers: 2, a TLS listener with mutual TLS and upstream_tls, a cluster)
        ^  real traffic, one refused client                 GET /metrics (supervisor)
    prometheus (scrape and rule evaluation every 1 s, the rules file loaded)
        ^  /api/v1/query, /api/v1/rules
    these tests: every expression parses and evaluates, every metric it names has a
    series, every recording rule and dashboard query has data

So a renamed metric or a typo in a rule or a panel fails here, not on the operator's pager.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml
from pymemcache.client.base import Client

from tests.certs import Pki, make_pki, tls_redis
from tests.cluster_helpers import ConfigEndpoint, free_range
from tests.support import (
    CacheportProcess,
    ServerProcess,
    port_open,
    start_server,
    stop_process,
    wait_until,
)
from tests.test_alert_rules import RULES, prometheus_binary

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "deploy" / "grafana" / "cacheport.json"
HOST = "127.0.0.1"
# Grafana's variables as the test fills them in: every host, every listener.
GRAFANA_VARIABLES = {"instance": ".*", "listener": ".*", "__rate_interval": "1m",
                     "__interval": "15s", "__range": "1h"}

pytestmark = pytest.mark.timeout(120)


@dataclass
class Stack:
    prometheus: str  # http://127.0.0.1:PORT
    admin: str  # cacheport's (the supervisor's) admin endpoint, host:port

    def query(self, expr: str) -> dict[str, Any]:
        url = f"{self.prometheus}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        try:
            with urllib.request.urlopen(url, timeout=10) as reply:
                doc: dict[str, Any] = json.load(reply)
        except urllib.error.HTTPError as exc:  # 400: the expression does not parse
            body = exc.read()
            try:
                doc = json.loads(body)
            except ValueError:  # 503 while starting: plain text
                doc = {"status": "error", "error": f"{exc.code}: {body[:200]!r}"}
        return doc

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.prometheus}/-/ready", timeout=5) as reply:
                return bool(reply.status == 200)
        except OSError:  # refused while starting, or 503 (HTTPError is an OSError)
            return False

    def series(self, expr: str) -> list[dict[str, Any]]:
        doc = self.query(expr)
        assert doc["status"] == "success", f"{expr!r}: {doc.get('error')}"
        result: list[dict[str, Any]] = doc["data"]["result"]
        return result

    def rules(self) -> list[dict[str, Any]]:
        with urllib.request.urlopen(f"{self.prometheus}/api/v1/rules", timeout=10) as reply:
            return [rule for group in json.load(reply)["data"]["groups"]
                    for rule in group["rules"]]


def traffic(pki: Pki, mc_port: int, tls_port: int, seed_port: int) -> None:
    """Connections on every listener (spread over both workers), and one refused client."""
    for i in range(12):
        client = Client((HOST, mc_port), timeout=5, connect_timeout=5)
        client.set(f"k{i}", b"v" * 100)
        assert client.get(f"k{i}") == b"v" * 100
        client.close()
    for _ in range(6):
        r = redis.Redis(port=tls_port, ssl=True, ssl_ca_certs=str(pki.ca_file),
                        ssl_certfile=str(pki.client_cert), socket_timeout=10)
        assert r.set("k", "v") and r.get("k") == b"v"
        r.close()
    client = Client((HOST, seed_port), timeout=5, connect_timeout=5)
    assert client.version()
    client.close()
    # Plain text to the TLS listener: refused (a TLS handshake that failed).
    with socket.create_connection((HOST, tls_port), timeout=5) as plain:
        plain.sendall(b"PING\r\n")
        plain.settimeout(5)
        try:
            while plain.recv(4096):
                pass
        except OSError:
            pass


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    prometheus = prometheus_binary("prometheus")
    tmp = tmp_path_factory.mktemp("prometheus")
    pki = make_pki(tmp)
    started: list[ServerProcess] = []
    endpoint: ConfigEndpoint | None = None
    cacheport: CacheportProcess | None = None
    prom: subprocess.Popen[bytes] | None = None
    prom_log = (tmp / "prometheus.log").open("wb")
    try:
        memcached = start_server("memcached")
        started.append(memcached)
        node = tls_redis(pki)
        started.append(node)
        cluster_nodes = [start_server("memcached") for _ in range(2)]
        started.extend(cluster_nodes)
        endpoint = ConfigEndpoint(cluster_nodes[0].port, [
            (f"mc-{i:04d}.test.cache.internal", HOST, n.port)
            for i, n in enumerate(cluster_nodes)])
        # Below the ephemeral range, where no outgoing connection (a health check, a worker's
        # discovery) can take a port between our choosing it and binding it.
        base = free_range(9)  # seed port, 4 node ports, then ours
        mc_port, tls_port, admin_port, prom_port = range(base + 5, base + 9)
        fast = {"interval": "500ms", "timeout": "500ms", "rise": 1, "fall": 2}
        port_map = {
            "workers": 2, "drain_timeout": "1s", "state_dir": str(tmp / "state"),
            "admin": {"listen": f"{HOST}:{admin_port}"},
            "defaults": {"health": fast},
            "listeners": [
                {"name": "mc", "listen": f"{HOST}:{mc_port}", "upstream": memcached.address,
                 "protocol": "memcached"},
                {"name": "tls", "listen": f"{HOST}:{tls_port}", "upstream": node.address,
                 "protocol": "redis",
                 "tls": {"cert": str(pki.server_cert), "key": str(pki.server_key),
                         "client_ca": str(pki.ca_file)},
                 "upstream_tls": {"ca": str(pki.ca_file), "server_name": "localhost"}}],
            "clusters": [
                {"name": "mcc", "engine": "memcached", "seed": f"{HOST}:{endpoint.port}",
                 "announce": HOST, "listen": HOST, "ports": f"{base + 1}-{base + 4}",
                 "seed_port": base, "refresh": "1s"}]}
        path = tmp / "cacheport.yaml"
        path.write_text(yaml.safe_dump(port_map))
        cacheport = CacheportProcess(path)
        wait_until(lambda: "serving with 2 workers" in cacheport.log()
                   or cacheport.proc.poll() is not None, 30, message="both workers ready")
        assert cacheport.proc.poll() is None, cacheport.log()
        wait_until(lambda: port_open(base), 15, message="the cluster's seed port")
        traffic(pki, mc_port, tls_port, base)

        (tmp / "prometheus.yml").write_text(yaml.safe_dump({
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s",
                       "scrape_timeout": "1s"},
            "rule_files": [str(RULES)],
            "scrape_configs": [{"job_name": "cacheport",
                                "static_configs": [{"targets": [f"{HOST}:{admin_port}"]}]}]}))
        prom = subprocess.Popen(
            [prometheus, f"--config.file={tmp / 'prometheus.yml'}",
             f"--storage.tsdb.path={tmp / 'tsdb'}", f"--web.listen-address={HOST}:{prom_port}",
             "--log.level=warn"],
            stdout=subprocess.DEVNULL, stderr=prom_log)
        s = Stack(f"http://{HOST}:{prom_port}", f"{HOST}:{admin_port}")
        wait_until(lambda: prom.poll() is not None or s.ready(), 30, interval=0.1,
                   message="prometheus to be ready")
        assert prom.poll() is None, (tmp / "prometheus.log").read_text()

        def ready() -> bool:
            # Scraped, and every rule evaluated after at least two scrapes (a rate needs two).
            if not s.series('up{job="cacheport"} == 1'):
                return False
            if not s.series('count_over_time(cacheport_build_info{worker="0"}[1m]) >= 3'):
                return False
            if not s.series("changes(cacheport_reloads_total[1m]) > 0"):
                return False
            return all(rule["health"] == "ok" and rule["lastEvaluation"] > "2000"
                       for rule in s.rules()) and all(
                s.series(rule["name"]) for rule in s.rules() if rule["type"] == "recording")

        wait_until(lambda: s.series('up{job="cacheport"} == 1'), 20, interval=0.2,
                   message="prometheus to scrape cacheport")
        # Inside Prometheus's windows: a reload (the dashboard marks it) and more traffic.
        request = urllib.request.Request(f"http://{s.admin}/-/reload", method="POST")
        with urllib.request.urlopen(request, timeout=10) as reply:
            assert reply.status == 200
        traffic(pki, mc_port, tls_port, base)
        try:
            wait_until(ready, 30, interval=0.5, message="prometheus to scrape and evaluate")
        except AssertionError:
            pass  # the tests below name what is missing
        yield s
    finally:
        if prom is not None:
            stop_process(prom, 10)
        prom_log.close()
        if cacheport is not None:
            cacheport.stop()
        if endpoint is not None:
            endpoint.close()
        for server in started:
            server.stop()


_KEYWORDS = {"and", "or", "unless", "by", "without", "on", "ignoring", "group_left",
             "group_right", "offset", "bool", "inf", "nan"}


def metric_names(expr: str) -> set[str]:
    """The metric (and recorded series) names a PromQL expression selects."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # strings
    text = re.sub(r"\{[^}]*\}", " ", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", " ", text)  # ranges
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    names = set()
    for match in re.finditer(r"(?<![\w.])[A-Za-z_:][A-Za-z0-9_:]*", text):
        if match.group(0) not in _KEYWORDS and not text[match.end():].lstrip().startswith("("):
            names.add(match.group(0))
    return names


def test_metric_names_finds_selectors_and_skips_functions_labels_and_keywords() -> None:
    expr = ('sum by (job, instance) (rate(process_cpu_seconds_total{job="a b"}[5m]) '
            "and on (job, instance) cacheport_build_info) / ignoring (x) group_left "
            "listener:cacheport_upstreams_up:sum - time() < 14 * 86400 + 1e3")
    assert metric_names(expr) == {"process_cpu_seconds_total", "cacheport_build_info",
                                  "listener:cacheport_upstreams_up:sum"}


def grafana_substitute(expr: str) -> str:
    for name, value in sorted(GRAFANA_VARIABLES.items(), key=lambda kv: -len(kv[0])):
        expr = expr.replace(f"${{{name}}}", value).replace(f"${name}", value)
    assert "$" not in expr, f"a variable the test does not know: {expr}"
    return expr


def dashboard_queries() -> list[tuple[str, str]]:
    """(where, PromQL) for every query of the dashboard: panels, annotations, variables."""
    doc = json.loads(DASHBOARD.read_text())
    out: list[tuple[str, str]] = []

    def panels(items: list[dict[str, Any]]) -> None:
        for panel in items:
            panels(panel.get("panels", []))
            for target in panel.get("targets", []):
                out.append((f"panel {panel['title']!r} {target['refId']}", target["expr"]))

    panels(doc["panels"])
    for annotation in doc.get("annotations", {}).get("list", []):
        if "expr" in annotation:
            out.append((f"annotation {annotation['name']!r}", annotation["expr"]))
    for variable in doc["templating"]["list"]:
        if variable["type"] != "query":
            continue
        query = variable["query"]["query"] if isinstance(variable["query"], dict) \
            else variable["query"]
        match = re.fullmatch(r"label_values\((.*),\s*(\w+)\)", query)
        assert match, f"variable {variable['name']}: {query!r} is not label_values(...)"
        out.append((f"variable ${variable['name']}",
                    f"count by ({match.group(2)}) ({match.group(1)})"))
    return out


def check(stack: Stack, where: str, expr: str, must_have_data: bool) -> list[str]:
    problems = []
    doc = stack.query(expr)
    if doc["status"] != "success":
        return [f"{where}: does not evaluate: {doc.get('error')}"]
    if must_have_data and not doc["data"]["result"]:
        problems.append(f"{where}: no data: {expr}")
    for name in sorted(metric_names(expr)):
        if not stack.series(f"count({{__name__={json.dumps(name)}}})"):
            problems.append(f"{where}: no series named {name}")
    return problems


def test_every_rule_evaluates_and_every_metric_it_names_exists(stack: Stack) -> None:
    doc = yaml.safe_load(RULES.read_text())
    problems = []
    for group in doc["groups"]:
        for rule in group["rules"]:
            name = rule.get("record") or rule["alert"]
            # An alert's condition is rightly empty while all is well; its parts are not.
            problems += check(stack, name, rule["expr"], must_have_data="record" in rule)
            if "record" in rule and not stack.series(rule["record"]):
                problems.append(f"{name}: nothing recorded")
    for rule in stack.rules():
        if rule["health"] != "ok":
            problems.append(f"{rule['name']}: Prometheus says {rule['health']}: "
                            f"{rule.get('lastError')}")
    assert not problems, "\n".join(problems)


def test_every_dashboard_query_returns_data(stack: Stack) -> None:
    queries = dashboard_queries()
    assert len(queries) > 25
    problems = []
    for where, expr in queries:
        problems += check(stack, where, grafana_substitute(expr), must_have_data=True)
    assert not problems, "\n".join(problems)


def test_every_leg_of_the_tls_listener_has_a_certificate_gauge(stack: Stack) -> None:
    found = {s["metric"]["leg"] for s in stack.series(
        'cacheport_tls_certificate_expiry_timestamp_seconds{listener="tls"}')}
    assert found == {"termination", "client", "client_ca", "upstream", "upstream_ca"}


def test_promtool_check_metrics_is_clean_on_live_metrics(stack: Stack) -> None:
    with urllib.request.urlopen(f"http://{stack.admin}/metrics", timeout=10) as reply:
        body = reply.read()
    assert b"cacheport_tls_certificate_expiry_timestamp_seconds" in body
    result = subprocess.run([prometheus_binary("promtool"), "check", "metrics"], input=body,
                            capture_output=True, timeout=30)
    assert result.returncode == 0 and not result.stdout and not result.stderr, \
        (result.stdout + result.stderr).decode()


def test_the_dashboard_names_only_recorded_series_the_rules_file_records() -> None:
    recorded = {rule["record"] for group in yaml.safe_load(RULES.read_text())["groups"]
                for rule in group["rules"] if "record" in rule}
    used = {name for _where, expr in dashboard_queries() for name in metric_names(expr)
            if ":" in name}
    assert used and used <= recorded


def test_grafana_substitute_fills_every_variable_the_dashboard_uses() -> None:
    for _where, expr in dashboard_queries():
        grafana_substitute(expr)
