"""Cluster-aware forwarding: discovery, stable per-node ports, rewriting relays."""
