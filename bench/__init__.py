"""cacheport's bench: direct vs cacheport vs HAProxy, nginx, socat (and iptables DNAT), paired.

Run ``python -m bench --help``; see bench/README.md for what is measured and the results.
"""
