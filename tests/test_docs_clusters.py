"""docs/clusters.md's YAML examples are port maps cacheport accepts, one per shape."""

from __future__ import annotations

import re

from proxy.config import load_yaml, parse_config
from tests.support import ROOT


def test_every_yaml_example_in_the_clusters_doc_validates() -> None:
    text = (ROOT / "docs" / "clusters.md").read_text()
    blocks = re.findall(r"```yaml\n(.*?)```", text, re.S)
    engines = set()
    for block in blocks:
        config = parse_config(load_yaml(block, "docs/clusters.md"), "docs/clusters.md")
        engines |= {c.engine for c in config.clusters}
    assert engines == {"redis-cluster", "redis-replication", "memcached"}
