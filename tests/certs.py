"""Certificates for the TLS tests (trustme) and the real TLS-only servers that show them.

One ``Pki`` per test (the ``pki`` fixture in conftest.py) or per module: a CA, a server
certificate for localhost and 127.0.0.1, a client certificate for mutual TLS and a second
CA that signed nothing, all written as PEM files in one folder; ``issue`` makes more.
"""

from __future__ import annotations

import datetime
import ssl
from dataclasses import dataclass
from pathlib import Path

import trustme

from tests.support import ServerProcess, free_port, start_server

LOCAL = ("localhost", "127.0.0.1")  # what the server certificates are for, unless told
CLIENT = "client@example.test"


@dataclass
class Pki:
    dir: Path
    ca: trustme.CA
    ca_file: Path
    server_cert: Path
    server_key: Path
    client_cert: Path  # cert and key in one PEM
    other_ca_file: Path  # a CA that signed nothing here

    def issue(self, name: str, *identities: str, not_before: datetime.datetime | None = None,
              not_after: datetime.datetime | None = None) -> tuple[Path, Path]:
        """A certificate for ``identities`` (localhost and 127.0.0.1 unless given) and its
        key, as ``name.pem`` and ``name.key``."""
        cert = self.ca.issue_cert(*(identities or LOCAL), not_before=not_before,
                                  not_after=not_after)
        cert_path, key_path = self.dir / f"{name}.pem", self.dir / f"{name}.key"
        cert.cert_chain_pems[0].write_to_path(str(cert_path))
        cert.private_key_pem.write_to_path(str(key_path))
        return cert_path, key_path

    def client_context(self) -> ssl.SSLContext:
        """What a client that trusts this CA (and only it) connects with."""
        return ssl.create_default_context(cafile=str(self.ca_file))

    def issue_client(self, name: str, not_after: datetime.datetime | None = None) -> Path:
        """A client certificate for CLIENT, certificate and key in one PEM ``name.pem``."""
        path = self.dir / f"{name}.pem"
        self.ca.issue_cert(CLIENT, not_after=not_after) \
            .private_key_and_cert_chain_pem.write_to_path(str(path))
        return path


def make_pki(folder: Path) -> Pki:
    ca = trustme.CA()
    ca_file, other = folder / "ca.pem", folder / "other-ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    trustme.CA().cert_pem.write_to_path(str(other))
    pki = Pki(folder, ca, ca_file, folder / "x", folder / "x", folder / "x", other)
    pki.server_cert, pki.server_key = pki.issue("server")
    pki.client_cert = pki.issue_client("client")
    return pki


def tls_redis(pki: Pki, cert: Path | None = None, key: Path | None = None, *,
              extra: list[str] | None = None, kind: str = "redis", host: str = "127.0.0.1",
              port: int | None = None) -> ServerProcess:
    """A redis-server (``kind="valkey"``: valkey-server) speaking only TLS (in-transit
    encryption on), on a free port, with the pki's server certificate unless given."""
    port = port or free_port(host)
    return start_server(kind, ["--port", "0", "--tls-port", str(port),
                               "--tls-cert-file", str(cert or pki.server_cert),
                               "--tls-key-file", str(key or pki.server_key),
                               "--tls-ca-cert-file", str(pki.ca_file),
                               "--tls-auth-clients", "no", *(extra or [])],
                        host=host, port=port)


def tls_memcached(pki: Pki) -> ServerProcess:
    """A memcached speaking only TLS, with the pki's server certificate."""
    return start_server("memcached", ["-Z", "-o", f"ssl_chain_cert={pki.server_cert},"
                                                  f"ssl_key={pki.server_key}"])
