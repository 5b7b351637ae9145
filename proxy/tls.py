"""SSL contexts for both legs, built (and so checked) before a listener serves, and the
notAfter of every certificate they hold or have seen (for the expiry gauge).

Client leg: cacheport terminates TLS with the listener's certificate (TLS 1.2
or newer; optional mutual TLS). Upstream leg: cacheport originates TLS to
nodes with in-transit encryption, verifying the certificate and sending SNI
unless the port map says ``verify: false``.
"""

from __future__ import annotations

import base64
import binascii
import datetime
import functools
import os
import re
import ssl
from collections.abc import Mapping

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
    # create_default_context() turns on key logging when SSLKEYLOGFILE is set; CPython's
    # callback then runs for the engine thread's connections, which are not its objects,
    # and crashes the process.
    ctx.keylog_filename = None  # type: ignore[assignment]
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if not tls.verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def upstream_server_name(lc: ListenerConfig) -> str:
    """SNI and the name the node's certificate must carry: ``server_name`` or the host."""
    assert lc.upstream_tls is not None
    return lc.upstream_tls.server_name or lc.upstream.host


# -- certificate expiry: what cacheport_tls_certificate_expiry_timestamp_seconds reads -------

LEG_TERMINATION = "termination"  # the certificate cacheport presents to clients
LEG_CLIENT = "client"  # a client's certificate, as seen at the last mutual-TLS handshake
LEG_CLIENT_CA = "client_ca"  # the CA bundle client certificates must chain to (mutual TLS)
LEG_UPSTREAM = "upstream"  # the node's certificate, as seen at the last handshake
LEG_UPSTREAM_CA = "upstream_ca"  # the CA bundle the node's certificate is verified with


def _der_item(data: bytes, at: int) -> tuple[int, int, int]:
    """``(tag, start of contents, end of contents)`` of the DER item at ``at``."""
    tag, length = data[at], data[at + 1]
    at += 2
    if length & 0x80:
        n = length & 0x7F
        if not 0 < n <= 4:
            raise ValueError("unsupported DER length")
        length = int.from_bytes(data[at:at + n], "big")
        at += n
    if at + length > len(data):
        raise ValueError("DER item runs past the end")
    return tag, at, at + length


def not_after(der: bytes) -> float:
    """A DER X.509 certificate's notAfter as Unix time; ``ValueError`` if it is not one.

    Certificate ::= SEQUENCE { tbsCertificate SEQUENCE { [0] version OPTIONAL,
    serialNumber, signature, issuer, validity SEQUENCE { notBefore, notAfter }, ...
    (RFC 5280 4.1). Read by hand because the standard library only decodes a
    verified peer's certificate (``getpeercert()``), and a ``verify: false`` peer or
    a CA bundle's certificates are none of those.
    """
    try:
        _tag, at, _end = _der_item(der, 0)  # Certificate
        _tag, at, _end = _der_item(der, at)  # tbsCertificate
        tag, start, end = _der_item(der, at)
        if tag == 0xA0:  # explicit version, then serialNumber
            tag, start, end = _der_item(der, end)
        for _ in range(2):  # signature, issuer
            tag, start, end = _der_item(der, end)
        tag, start, end = _der_item(der, end)  # validity
        if tag != 0x30:
            raise ValueError("no validity")
        _tag, _s, after = _der_item(der, start)  # notBefore
        tag, start, end = _der_item(der, after)  # notAfter
    except IndexError:
        raise ValueError("truncated DER") from None
    text = der[start:end].decode("ascii", "replace")
    if tag == 0x17 and len(text) == 13 and text.endswith("Z"):  # UTCTime YYMMDDHHMMSSZ
        year = int(text[:2])
        text = f"{1900 + year if year >= 50 else 2000 + year}{text[2:]}"
    elif not (tag == 0x18 and len(text) == 15 and text.endswith("Z")):  # GeneralizedTime
        raise ValueError(f"notAfter in an unexpected form: {text!r}")
    try:
        when = datetime.datetime.strptime(text, "%Y%m%d%H%M%SZ")
    except ValueError:
        raise ValueError(f"notAfter is not a time: {text!r}") from None
    return when.replace(tzinfo=datetime.UTC).timestamp()


_PEM = re.compile(rb"-----BEGIN CERTIFICATE-----\s*(.+?)\s*-----END CERTIFICATE-----", re.S)


@functools.lru_cache(maxsize=256)
def _file_expiry(path: str, _mtime_ns: int, _size: int) -> float | None:
    """The earliest notAfter among the certificates of a PEM file (cached per version)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
        times = [not_after(base64.b64decode(m.group(1))) for m in _PEM.finditer(data)]
    except (OSError, ValueError, binascii.Error):
        return None  # loading the context says what is wrong with the file
    return min(times) if times else None


def file_expiry(path: str) -> float | None:
    """``_file_expiry`` keyed by the file's mtime and size: a reload re-reads a changed file,
    and three thousand listeners sharing one bundle parse it once."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return _file_expiry(path, st.st_mtime_ns, st.st_size)


class PeerCertificates:
    """notAfter of the certificate each listener's peers showed at their last handshake.

    Per process and keyed by listener name, so it outlives the ``ListenerTls`` a reload
    replaces. ``seen_der`` is what the Python relays call after a handshake; a relay that
    handshakes elsewhere (the native engine) calls ``seen`` with the time it read.
    """

    def __init__(self) -> None:
        self._times: dict[str, dict[str, float]] = {}
        self._last_der: dict[tuple[str, str], bytes] = {}

    def seen(self, listener: str, leg: str, not_after: float) -> None:
        self._times.setdefault(listener, {})[leg] = not_after

    def seen_der(self, listener: str, leg: str, der: bytes | None) -> None:
        """Record from a DER certificate; the same certificate as last time costs a compare."""
        key = (listener, leg)
        if not der or self._last_der.get(key) == der:
            return
        try:
            self.seen(listener, leg, not_after(der))
        except ValueError:
            return  # a certificate OpenSSL accepted but we cannot read: no gauge, no noise
        self._last_der[key] = der

    def of(self, listener: str) -> Mapping[str, float]:
        return self._times.get(listener, _NONE)

    def forget(self, listener: str) -> None:
        """Drop what ``listener`` saw: its next handshakes start afresh."""
        self._times.pop(listener, None)
        for key in [k for k in self._last_der if k[0] == listener]:
            del self._last_der[key]


_NONE: Mapping[str, float] = {}
PEERS = PeerCertificates()


def record_certificate_expiry(listener: str, leg: str, not_after: float) -> None:
    """The hook for any relay that handshakes: ``not_after`` (Unix time) of the certificate
    the peer on ``leg`` (``upstream``, ``client``) showed to ``listener`` just now."""
    PEERS.seen(listener, leg, not_after)


class ListenerTls:
    """The contexts one listener uses; rebuilt on every start and reload."""

    __slots__ = ("client", "files", "name", "server", "server_name")

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
        self.name = lc.name
        # notAfter of the files this listener holds, read once per start and reload.
        files = {LEG_TERMINATION: lc.tls.cert if lc.tls else None,
                 LEG_CLIENT_CA: lc.tls.client_ca if lc.tls else None,
                 LEG_UPSTREAM_CA: lc.upstream_tls.ca if lc.upstream_tls else None}
        self.files = {leg: t for leg, path in files.items()
                      if path is not None and (t := file_expiry(path)) is not None}

    def expiry(self) -> Mapping[str, float]:
        """notAfter (Unix time) per leg: the files held, and the peers seen at handshakes."""
        seen = PEERS.of(self.name)
        return {**self.files, **seen} if seen else self.files

    def upstream_seen(self, ssl_object: ssl.SSLObject | None) -> None:
        """After a handshake with the node: note its certificate's notAfter."""
        if ssl_object is not None:
            PEERS.seen_der(self.name, LEG_UPSTREAM, ssl_object.getpeercert(binary_form=True))

    def client_seen(self, ssl_object: ssl.SSLObject | None) -> None:
        """After a mutual-TLS handshake with a client: note its certificate's notAfter."""
        if ssl_object is not None and self.server is not None \
                and self.server.verify_mode == ssl.CERT_REQUIRED:
            PEERS.seen_der(self.name, LEG_CLIENT, ssl_object.getpeercert(binary_form=True))
