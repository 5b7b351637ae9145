"""SSL contexts for both legs, built (and so checked) before a listener serves.

Client leg: cacheport terminates TLS with the listener's certificate (TLS 1.2
or newer; optional mutual TLS). Upstream leg: cacheport originates TLS to
nodes with in-transit encryption, verifying the certificate and sending SNI
unless the port map says ``verify: false``.
"""

from __future__ import annotations

import ssl

from .config import ListenerConfig, TlsConfig, UpstreamTlsConfig


class TlsError(Exception):
    """A certificate, key or CA file that cannot be used."""


def server_context(tls: TlsConfig) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(tls.cert, tls.key)
    except (ssl.SSLError, OSError) as exc:
        raise TlsError(f"cannot use cert {tls.cert!r} with key {tls.key!r}: "
                       f"{getattr(exc, 'reason', None) or exc}") from None
    if tls.client_ca is not None:
        try:
            ctx.load_verify_locations(cafile=tls.client_ca)
        except (ssl.SSLError, OSError) as exc:
            raise TlsError(f"cannot use client_ca {tls.client_ca!r}: {exc}") from None
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def client_context(tls: UpstreamTlsConfig) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=tls.ca) if tls.ca else ssl.create_default_context()
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if not tls.verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def upstream_server_name(lc: ListenerConfig) -> str:
    """SNI and the name the node's certificate must carry: ``server_name`` or the host."""
    assert lc.upstream_tls is not None
    return lc.upstream_tls.server_name or lc.upstream.host


class ListenerTls:
    """The contexts one listener uses; rebuilt on every start and reload."""

    __slots__ = ("client", "server", "server_name")

    def __init__(self, lc: ListenerConfig) -> None:
        try:
            self.server = server_context(lc.tls) if lc.tls is not None else None
            self.client = client_context(lc.upstream_tls) if lc.upstream_tls is not None \
                else None
        except TlsError as exc:
            field = "tls" if lc.tls is not None and "upstream" not in str(exc) else "upstream_tls"
            raise TlsError(f"listener {lc.name!r}: field {field!r}: {exc}") from None
        except (ssl.SSLError, OSError) as exc:
            raise TlsError(f"listener {lc.name!r}: field 'upstream_tls': {exc}") from None
        self.server_name = upstream_server_name(lc) if lc.upstream_tls is not None else None
