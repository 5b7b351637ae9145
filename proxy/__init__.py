"""cacheport: a userspace TCP proxy for reaching ElastiCache nodes through a NAT host."""

__version__ = "0.1.0"
