"""Why a connection ended: one vocabulary for the connection log, the ``reason`` label of
``cacheport_connections_refused_total`` / ``cacheport_connections_closed_total`` and the
refusal warnings.

Values are snake_case, as Prometheus label values usually are. A *refusal* ends a client
connection before it reaches an upstream; a *close* ends a relayed one (who closed
first, or why cacheport closed it), like the termination state of HAProxy's tcplog.
Pure: nothing here imports the rest of the package.
"""

from __future__ import annotations

# -- refusals: the client never reached an upstream ------------------------------------
NOT_ALLOWED = "not_allowed"
MAX_CONNECTIONS = "max_connections"
MAX_CONNECTIONS_PER_CLIENT = "max_connections_per_client"
UPSTREAM_DOWN = "upstream_down"  # also a close: on_down: close cut it
TLS_HANDSHAKE_FAILED = "tls_handshake_failed"
UPSTREAM_TLS_FAILED = "upstream_tls_failed"
DNS_FAILED = "dns_failed"
UPSTREAM_CONNECT_FAILED = "upstream_connect_failed"
CLIENT_ERROR = "client_error"
FD_LIMIT = "fd_limit"
# sni_routes: what the ClientHello (proxy/protocols/tls_hello.py) did not give
NOT_TLS = "not_tls"
CLIENT_HELLO_MALFORMED = "client_hello_malformed"
CLIENT_HELLO_TOO_LARGE = "client_hello_too_large"
CLIENT_HELLO_TIMEOUT = "client_hello_timeout"
CLIENT_HELLO_INCOMPLETE = "client_hello_incomplete"
SNI_MISSING = "sni_missing"
SNI_NO_MATCH = "sni_no_match"
PROXY_UNTRUSTED = "proxy_protocol_untrusted"
PROXY_MALFORMED = "proxy_protocol_malformed"
PROXY_TIMEOUT = "proxy_protocol_timeout"
PROXY_MISSING = "proxy_protocol_missing"

# -- closes: a relayed connection ended ---------------------------------------------------
CLIENT_CLOSED = "client_closed"
UPSTREAM_CLOSED = "upstream_closed"
CLIENT_RESET = "client_reset"
UPSTREAM_RESET = "upstream_reset"
IDLE_TIMEOUT = "idle_timeout"
DRAINED = "drained"
CUT_AT_STOP = "cut_at_stop"
PROTOCOL_ERROR = "protocol_error"
UNKNOWN = "unknown"

REFUSALS: dict[str, str] = {
    NOT_ALLOWED: "the client's address is not in the listener's allow list",
    MAX_CONNECTIONS: "max_connections connections were open",
    MAX_CONNECTIONS_PER_CLIENT: "the client had max_connections_per_client open",
    UPSTREAM_DOWN: "every upstream (and backup) was DOWN",
    TLS_HANDSHAKE_FAILED: "the client's TLS handshake failed or timed out",
    UPSTREAM_TLS_FAILED: "the TLS handshake with the upstream failed",
    DNS_FAILED: "the upstream's name did not resolve within connect_timeout",
    UPSTREAM_CONNECT_FAILED: "no address of the upstream accepted within connect_timeout",
    CLIENT_ERROR: "the client's socket failed while the upstream was being dialled",
    FD_LIMIT: "the process was at its open-files limit (RLIMIT_NOFILE): closed at once",
    NOT_TLS: "sni_routes: the first bytes were not a TLS handshake record",
    CLIENT_HELLO_MALFORMED: "sni_routes: the ClientHello did not parse",
    CLIENT_HELLO_TOO_LARGE: "sni_routes: the ClientHello passed 16 KiB",
    CLIENT_HELLO_TIMEOUT: "sni_routes: no whole ClientHello within 5 s",
    CLIENT_HELLO_INCOMPLETE: "sni_routes: the connection ended before its ClientHello did",
    SNI_MISSING: "sni_routes: the ClientHello names no server",
    SNI_NO_MATCH: "sni_routes: no route matches the name the client asked for",
    PROXY_UNTRUSTED: "a connection from outside proxy_protocol_from",
    PROXY_MALFORMED: "the PROXY header did not parse",
    PROXY_TIMEOUT: "no complete PROXY header within 3 s",
    PROXY_MISSING: "the connection ended before its PROXY header",
}

CLOSES: dict[str, str] = {
    CLIENT_CLOSED: "the client closed first (FIN); the upstream's side was then closed",
    UPSTREAM_CLOSED: "the upstream closed first (FIN)",
    CLIENT_RESET: "the client's side failed first (a reset, a write that erred)",
    UPSTREAM_RESET: "the upstream's side failed first",
    IDLE_TIMEOUT: "no byte either way for idle_timeout",
    UPSTREAM_DOWN: "on_down: close cut it when its upstream went DOWN (or a primary "
                   "changed, close_on_failover)",
    DRAINED: "its listener was removed (reload, a cluster node left) and drain_timeout "
             "(retire_grace) ran out",
    CUT_AT_STOP: "cacheport stopped and drain_timeout ran out (or a second SIGTERM)",
    PROTOCOL_ERROR: "a cluster listener's peer sent bytes its framer cannot parse",
    UNKNOWN: "the relay could not tell (e.g. the native engine refused the connection)",
}

# The native engine reports who ended first as 1 + side (0: client, 1: upstream) for an
# EOF and 3 + side for a failure; 0 when it cannot tell (engine_loop.c ``first``).
_ENGINE_FIRST = (UNKNOWN, CLIENT_CLOSED, UPSTREAM_CLOSED, CLIENT_RESET, UPSTREAM_RESET)


def from_engine(first: int) -> str:
    """The close reason for the native engine's ``first`` code."""
    return _ENGINE_FIRST[first] if 0 <= first < len(_ENGINE_FIRST) else UNKNOWN
