"""cacheport's bench: direct vs cacheport vs HAProxy, nginx, socat (and iptables DNAT), paired.

One entry point, ``python -m bench SUBCOMMAND`` (``run``, ``ab``, ``pool``, ``tls``,
``cluster``, ``protocols``); see ``python -m bench --help`` and bench/README.md.
"""
