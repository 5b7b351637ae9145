"""cacheport_tls_certificate_expiry_timestamp_seconds: one gauge per certificate cacheport
holds or has seen, so an alert can fire weeks before one expires."""

from __future__ import annotations

import datetime
import ssl
from pathlib import Path

import pytest
import redis
import trustme

from proxy.tls import PEERS, file_expiry, not_after, record_certificate_expiry
from tests.certs import Pki, tls_redis
from tests.healthkit import metrics, proxy_with_admin, sample

GAUGE = "cacheport_tls_certificate_expiry_timestamp_seconds"
UTC = datetime.UTC


def der_of(cert: trustme.LeafCert | trustme.CA) -> bytes:
    pem = cert.cert_pem if isinstance(cert, trustme.CA) else cert.cert_chain_pems[0]
    return ssl.PEM_cert_to_DER_cert(pem.bytes().decode())


@pytest.mark.parametrize("when", [
    datetime.datetime(2031, 5, 6, 7, 8, 9, tzinfo=UTC),  # UTCTime (before 2050)
    datetime.datetime(2051, 3, 4, 5, 6, 7, tzinfo=UTC),  # GeneralizedTime (2050 on)
])
def test_not_after_reads_both_time_forms_of_rfc_5280(when: datetime.datetime) -> None:
    leaf = trustme.CA().issue_cert("a.example", not_after=when)
    assert not_after(der_of(leaf)) == when.timestamp()


def test_not_after_rejects_truncated_and_foreign_bytes_with_value_error() -> None:
    der = der_of(trustme.CA().issue_cert("a.example"))
    for cut in range(0, len(der), 5):
        with pytest.raises(ValueError):
            not_after(der[:cut])
    with pytest.raises(ValueError):
        not_after(b"\x30\x03\x02\x01\x01")


def test_a_bundle_reports_its_earliest_certificate_and_a_changed_file_is_read_again(
    tmp_path: Path,
) -> None:
    ca = trustme.CA()
    soon = datetime.datetime(2030, 1, 2, tzinfo=UTC)
    later = datetime.datetime(2040, 1, 2, tzinfo=UTC)
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes(ca.issue_cert("b", not_after=later).cert_chain_pems[0].bytes()
                       + ca.issue_cert("a", not_after=soon).cert_chain_pems[0].bytes())
    assert file_expiry(str(bundle)) == soon.timestamp()
    bundle.write_bytes(ca.issue_cert("b", not_after=later).cert_chain_pems[0].bytes())
    assert file_expiry(str(bundle)) == later.timestamp()
    assert file_expiry(str(tmp_path / "missing.pem")) is None
    (tmp_path / "junk.pem").write_text("-----BEGIN CERTIFICATE-----\nnot base64!\n"
                                       "-----END CERTIFICATE-----\n")
    assert file_expiry(str(tmp_path / "junk.pem")) is None


def test_every_leg_has_its_gauge_and_the_peers_ones_come_with_the_first_handshake(
    pki: Pki,
) -> None:
    PEERS.forget("tls")  # per process: another test's listener "tls" may have handshaken
    server_until = datetime.datetime(2033, 3, 3, tzinfo=UTC)
    node_until = datetime.datetime(2034, 4, 4, tzinfo=UTC)
    server_cert, server_key = pki.issue("front", not_after=server_until)
    node_cert, node_key = pki.issue("node", not_after=node_until)
    ca_until = not_after(der_of(pki.ca))
    client_until = datetime.datetime(2035, 5, 5, tzinfo=UTC)
    client_cert = pki.issue_client("client-2035", not_after=client_until)
    node = tls_redis(pki, node_cert, node_key)
    try:
        listener = {"name": "tls", "listen": "127.0.0.1:0", "upstream": node.address,
                    "protocol": "redis",
                    "tls": {"cert": str(server_cert), "key": str(server_key),
                            "client_ca": str(pki.ca_file)},
                    "upstream_tls": {"ca": str(pki.ca_file), "server_name": "localhost"}}
        with proxy_with_admin([listener]) as proxy:
            before = metrics(proxy)
            assert sample(before, GAUGE, listener="tls",
                          leg="termination") == server_until.timestamp()
            assert sample(before, GAUGE, listener="tls", leg="client_ca") == ca_until
            assert sample(before, GAUGE, listener="tls", leg="upstream_ca") == ca_until
            for leg in ("upstream", "client"):  # not before the first handshake
                assert (GAUGE, frozenset({("listener", "tls"), ("leg", leg)})) not in before
            r = redis.Redis(port=proxy.port("tls"), ssl=True, ssl_ca_certs=str(pki.ca_file),
                            ssl_certfile=str(client_cert), socket_timeout=10)
            assert r.ping()
            r.close()
            after = metrics(proxy)
            assert sample(after, GAUGE, listener="tls", leg="upstream") == node_until.timestamp()
            assert sample(after, GAUGE, listener="tls", leg="client") == client_until.timestamp()
    finally:
        node.stop()
        PEERS.forget("tls")  # per process: leave no listener "tls" to other tests


def test_the_hook_for_other_relays_sets_the_gauge_of_its_listener() -> None:
    record_certificate_expiry("hooked", "upstream", 1_900_000_000.0)
    try:
        assert PEERS.of("hooked") == {"upstream": 1_900_000_000.0}
        assert PEERS.of("other") == {}
    finally:
        PEERS.forget("hooked")
