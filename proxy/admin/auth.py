"""Who may use the admin endpoint, and who may change state through it: pure decisions.

::

    source not in admin.allow            -> 403 for every route ("not allowed")
    GET / HEAD (/, /status, /metrics...) -> open to allowed sources: probes need no secret
    POST ... with admin.token set        -> Authorization: Bearer <token>, else 401
    POST ... without a token             -> 403 when the endpoint listens beyond loopback
                                            (unless insecure_writes), allowed on loopback

The token is compared in constant time and never appears in what these return.
"""

from __future__ import annotations

import hmac
import ipaddress
from dataclasses import dataclass

from ..config import Address, AdminConfig
from ..config.parsers import is_loopback

READ_METHODS = frozenset({"GET", "HEAD"})


@dataclass(frozen=True, slots=True)
class Refusal:
    status: int
    reason: str  # the counter's label: not_allowed, no_token, bad_token, token_required
    text: str  # what the client is told (and the log says); never holds the token


NOT_ALLOWED = Refusal(403, "not_allowed", "forbidden: this source is not in admin.allow")
NO_TOKEN = Refusal(401, "no_token", "unauthorized: this route needs Authorization: "
                                    "Bearer <admin token>")
BAD_TOKEN = Refusal(401, "bad_token", "unauthorized: wrong token")
TOKEN_REQUIRED = Refusal(
    403, "token_required", "forbidden: the admin endpoint listens beyond loopback and has no "
                           "token, so it refuses changes; set admin.token_file (or admin.token: "
                           "${VAR}), or admin.insecure_writes: true")


def source_allowed(source: str, config: AdminConfig) -> bool:
    """Whether ``source`` (a peer IP; v4-mapped v6 counts as v4) is in ``admin.allow``."""
    if config.allow is None:
        return True
    try:
        ip = ipaddress.ip_address(source.partition("%")[0])
    except ValueError:
        return False  # a Unix socket or something stranger: not an address we allowed
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any(ip in net for net in config.allow)


def writes_open(config: AdminConfig, bound: Address) -> bool:
    """Whether a write route passes without a token (no token set, loopback or opted out)."""
    return config.token is None and (is_loopback(bound) or config.insecure_writes)


def check_write(config: AdminConfig, bound: Address, authorization: str | None) -> Refusal | None:
    """None when a write request (not GET/HEAD) may go ahead, else why not."""
    if config.token is None:
        return None if writes_open(config, bound) else TOKEN_REQUIRED
    if not authorization:
        return NO_TOKEN
    scheme, _, given = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not given.strip():
        return NO_TOKEN
    expected = config.token.reveal().encode()
    return None if hmac.compare_digest(given.strip().encode(), expected) else BAD_TOKEN
