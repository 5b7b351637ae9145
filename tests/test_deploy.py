"""deploy/: the Kubernetes manifests validate against the API schemas (offline), the
CloudFormation template lints clean, and both carry a port map cacheport accepts with
the timings a load balancer needs (grace >= drain_delay + drain_timeout, checks on /readyz)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from proxy.config import load_yaml, parse_config

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "kubernetes"
CFN = ROOT / "deploy" / "aws" / "cacheport-ha.yaml"
KUBERNETES_VERSION = "1.30.0"


def manifests() -> dict[str, dict[str, Any]]:
    docs = {}
    for path in sorted(K8S.glob("*.yaml")):
        doc = yaml.safe_load(path.read_text())
        if doc.get("kind") != "Kustomization":
            docs[doc["kind"]] = doc
    return docs


def test_every_kubernetes_manifest_validates_against_the_schemas() -> None:
    kubernetes_validate = pytest.importorskip(
        "kubernetes_validate", reason="kubernetes-validate is in the test extra; pip install it")
    docs = manifests()
    assert set(docs) == {"ConfigMap", "Deployment", "Service", "PodDisruptionBudget"}
    for doc in docs.values():
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert sorted(kustomization["resources"]) == sorted(
        p.name for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")


def test_the_deployment_is_highly_available_and_drains_within_its_grace() -> None:
    docs = manifests()
    config = parse_config(load_yaml(docs["ConfigMap"]["data"]["cacheport.yaml"]), "<configmap>")
    spec = docs["Deployment"]["spec"]
    pod = spec["template"]["spec"]
    (container,) = pod["containers"]
    assert spec["replicas"] >= 2
    assert pod["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["resources"]["requests"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert pod["terminationGracePeriodSeconds"] >= config.drain_delay + config.drain_timeout
    # The NLB takes a pod out after interval x unhealthy threshold; drain_delay covers it.
    notes = docs["Service"]["metadata"]["annotations"]
    prefix = "service.beta.kubernetes.io/aws-load-balancer-"
    out_after = int(notes[prefix + "healthcheck-interval"]) * int(
        notes[prefix + "healthcheck-unhealthy-threshold"])
    assert config.drain_delay > out_after
    assert notes[prefix + "proxy-protocol"] == "*"
    assert notes[prefix + "healthcheck-path"] == "/readyz"
    assert "cross_zone.enabled=true" in notes[prefix + "attributes"]
    assert all(lc.proxy_protocol == "v2" for lc in config.listeners)
    assert docs["PodDisruptionBudget"]["spec"]["maxUnavailable"] == 1


class _CfnLoader(yaml.SafeLoader):
    """Reads CloudFormation's short-form tags (!Ref, !Sub...) as their plain values."""


_CfnLoader.add_multi_constructor("!", lambda loader, _tag, node: (
    loader.construct_scalar(node) if isinstance(node, yaml.ScalarNode)
    else loader.construct_sequence(node) if isinstance(node, yaml.SequenceNode)
    else loader.construct_mapping(node)))


def test_the_cloudformation_template_lints_clean() -> None:
    pytest.importorskip("cfnlint", reason="cfn-lint is in the test extra; pip install it")
    lint = shutil.which("cfn-lint", path=str(Path(sys.executable).parent)) or "cfn-lint"
    result = subprocess.run([lint, str(CFN)], capture_output=True, text=True, timeout=110)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_template_checks_readyz_sends_proxy_v2_and_admits_only_the_client() -> None:
    template = yaml.load(CFN.read_text(), Loader=_CfnLoader)  # a SafeLoader
    resources = template["Resources"]
    groups = {k: v["Properties"] for k, v in resources.items()
              if v["Type"] == "AWS::ElasticLoadBalancingV2::TargetGroup"}
    listeners = [v["Properties"] for v in resources.values()
                 if v["Type"] == "AWS::ElasticLoadBalancingV2::Listener"]
    assert len(groups) == len(listeners) == 5
    for tg in groups.values():
        attributes = {a["Key"]: a["Value"] for a in tg["TargetGroupAttributes"]}
        assert attributes["proxy_protocol_v2.enabled"] == "true"
        assert (tg["HealthCheckProtocol"], tg["HealthCheckPath"]) == ("HTTP", "/readyz")
    nlb_rules = resources["NlbSecurityGroup"]["Properties"]["SecurityGroupIngress"]
    assert {r["CidrIp"] for r in nlb_rules} == {"TrustedClientCidr"}  # !Ref, read plainly
    assert template["Parameters"]["TrustedClientCidr"]["Default"] == "198.51.100.27/32"
    # The port map in the user data is one cacheport accepts, the same on both hosts.
    user_data = resources["HostLaunchTemplate"]["Properties"]["LaunchTemplateData"][
        "UserData"]["Fn::Base64"]
    port_map = re.search(r"<<'YAML'\n(.*?)\nYAML\n", user_data, re.S)
    assert port_map is not None
    text = port_map.group(1).replace("${TrustedClientCidr}", "198.51.100.27/32").replace(
        "${VpcCidr}", "10.0.0.0/16")
    config = parse_config(load_yaml(text), "<user data>")
    assert sorted(lc.listen.port for lc in config.listeners) == sorted(
        tg["Port"] for tg in groups.values())
    assert all(lc.proxy_protocol == "v2" for lc in config.listeners)
