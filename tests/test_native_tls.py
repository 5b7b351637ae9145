"""TLS in the native engine (``relay: native`` on a TLS listener): real clients and tools
against termination, origination to a TLS redis-server with verification on, session
resumption, and the inputs that must end in a clean close or a counted, logged failure.

The shared behaviour (both legs, mutual TLS, reload, refusals) runs on both relays in
tests/test_tls.py; the close rule in tests/test_last_reply.py.
"""

from __future__ import annotations

import contextlib
import os
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from proxy.relay import engine as engine_mod
from proxy.relay.engine import NativeRelay, hub_for, native_tls_available
from tests.certs import Pki, tls_redis
from tests.support import (
    ProxyThread,
    ServerProcess,
    make_config,
    require_binary,
    start_server,
    until_closed,
    wait_until,
)

pytestmark = pytest.mark.skipif(not native_tls_available(),
                                reason="the native engine was not built with libssl here")

HOST = "127.0.0.1"


@pytest.fixture
def node() -> Iterator[ServerProcess]:
    with start_server("redis") as server:
        yield server


@pytest.fixture
def tls_node(pki: Pki) -> Iterator[ServerProcess]:
    with tls_redis(pki) as server:
        yield server


def terminating(upstream: ServerProcess, pki: Pki, **extra: Any) -> dict[str, Any]:
    return {"name": "t", "listen": f"{HOST}:0", "upstream": upstream.address,
            "protocol": "redis", "relay": "native",
            "tls": {"cert": str(pki.server_cert), "key": str(pki.server_key)}, **extra}


@contextlib.contextmanager
def proxy_for(*listeners: dict[str, Any]) -> Iterator[ProxyThread]:
    proxy = ProxyThread(make_config(list(listeners))).start()
    try:
        yield proxy
    finally:
        proxy.stop()


def engine_stats(proxy: ProxyThread) -> dict[str, int]:
    return proxy.call(lambda: hub_for(proxy.loop).stats())  # type: ignore[no-any-return,arg-type]


def test_redis_py_through_termination_is_relayed_by_the_engine(
        pki: Pki, node: ServerProcess) -> None:
    with proxy_for(terminating(node, pki)) as proxy:
        r = redis.Redis(port=proxy.port("t"), ssl=True, ssl_ca_certs=str(pki.ca_file),
                        socket_timeout=10)
        value = os.urandom(1 << 20)  # many records each way
        assert r.set("k", value)
        assert r.get("k") == value
        relays = proxy.call(lambda: list(proxy.server.listeners["t"].relays))
        assert relays and all(isinstance(x, NativeRelay) for x in relays)
        r.close()
        assert engine_stats(proxy)["tls_handshakes"] >= 1


def test_redis_cli_tls_and_openssl_s_client_against_termination(
        pki: Pki, node: ServerProcess) -> None:
    with proxy_for(terminating(node, pki)) as proxy:
        port = str(proxy.port("t"))
        cli = [require_binary("redis-cli"), "--tls", "--cacert", str(pki.ca_file), "-h", HOST,
               "-p", port]
        assert subprocess.run([*cli, "SET", "cli", "over tls"], capture_output=True,
                              timeout=20, check=True).stdout.strip() == b"OK"
        assert subprocess.run([*cli, "GET", "cli"], capture_output=True, timeout=20,
                              check=True).stdout.strip() == b"over tls"
        # s_client ends the session at EOF on its input: keep it open till the reply.
        proc = subprocess.Popen(
            [require_binary("openssl"), "s_client", "-connect", f"{HOST}:{port}", "-CAfile",
             str(pki.ca_file), "-verify_return_error", "-quiet", "-servername", "localhost"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        try:
            assert proc.stdin is not None and proc.stdout is not None
            proc.stdin.write(b"PING\r\n")
            proc.stdin.flush()
            assert proc.stdout.readline() == b"+PONG\r\n"
            proc.stdin.close()
        finally:
            proc.kill()
            proc.wait(10)
            if proc.stdout is not None:
                proc.stdout.close()


def test_both_legs_tls_with_verification_toward_the_node(
        pki: Pki, tls_node: ServerProcess) -> None:
    listener = terminating(tls_node, pki,
                           upstream_tls={"ca": str(pki.ca_file), "server_name": "localhost"})
    with proxy_for(listener) as proxy:
        r = redis.Redis(port=proxy.port("t"), ssl=True, ssl_ca_certs=str(pki.ca_file),
                        socket_timeout=10)
        value = os.urandom(3 << 20)
        assert r.set("both", value)
        assert r.get("both") == value
        assert [r.incr("n") for _ in range(200)][-1] == 200  # many small records
        r.close()


def test_origination_checks_the_name_on_the_node_s_certificate(
        pki: Pki, tls_node: ServerProcess, caplog: pytest.LogCaptureFixture) -> None:
    ok = {"name": "ok", "listen": f"{HOST}:0", "upstream": tls_node.address, "relay": "native",
          "upstream_tls": {"ca": str(pki.ca_file), "server_name": "localhost"}}
    wrong = {**ok, "name": "wrong",
             "upstream_tls": {"ca": str(pki.ca_file), "server_name": "cache.example.test"}}
    with proxy_for(ok, wrong) as proxy:
        r = redis.Redis(port=proxy.port("ok"), socket_timeout=10)
        assert r.ping()
        r.close()
        assert until_closed(proxy.port("wrong"), b"PING\r\n", HOST) == b""
        stats = proxy.server.listeners["wrong"].stats
        wait_until(lambda: stats.refused.get("upstream_tls_failed") == 1, 5)
    lines = [r.getMessage() for r in caplog.records if "TLS handshake with upstream" in
             r.getMessage()]
    assert lines and "certificate verify failed" in lines[0], lines


def test_sessions_resume_on_reconnect(pki: Pki, node: ServerProcess) -> None:
    """Tickets on the termination side: a client that reconnects with its session skips
    the full handshake (a reconnect storm after a failover stays cheap)."""
    ctx = pki.client_context()
    with proxy_for(terminating(node, pki)) as proxy:
        port = proxy.port("t")
        session = None
        reused = []
        for _ in range(4):
            with socket.create_connection((HOST, port), timeout=5) as raw, \
                    ctx.wrap_socket(raw, server_hostname="localhost", session=session) as conn:
                conn.sendall(b"PING\r\n")
                assert conn.recv(100) == b"+PONG\r\n"  # TLS 1.3 tickets arrive by now
                reused.append(conn.session_reused)
                session = conn.session
        assert reused[0] is False and all(reused[1:]), reused
        wait_until(lambda: engine_stats(proxy)["tls_resumed"] >= 3, 5,
                   message="the engine to count resumed handshakes")


def test_a_silent_client_is_cut_at_connect_timeout_and_counted(
        pki: Pki, node: ServerProcess, caplog: pytest.LogCaptureFixture) -> None:
    with proxy_for(terminating(node, pki, connect_timeout=1)) as proxy, \
            socket.create_connection((HOST, proxy.port("t")), timeout=10) as raw:
        started = time.monotonic()
        with contextlib.suppress(ConnectionResetError):
            assert raw.recv(100) == b""
        assert time.monotonic() - started < 8
        stats = proxy.server.listeners["t"].stats
        wait_until(lambda: stats.refused.get("tls_handshake_failed") == 1, 5)
    assert any("handshake timed out" in r.getMessage() for r in caplog.records)


def test_a_stalled_handshake_does_not_stall_other_connections(
        pki: Pki, node: ServerProcess) -> None:
    with proxy_for(terminating(node, pki)) as proxy:
        port = proxy.port("t")
        stalled = [socket.create_connection((HOST, port), timeout=5) for _ in range(5)]
        for sock in stalled:  # a ClientHello's record header and a few bytes, no more
            sock.sendall(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")
        r = redis.Redis(port=port, ssl=True, ssl_ca_certs=str(pki.ca_file), socket_timeout=5)
        started = time.monotonic()
        for i in range(200):
            assert r.set(f"k{i}", i)
        assert time.monotonic() - started < 10
        r.close()
        for sock in stalled:
            sock.close()
        wait_until(lambda: proxy.server.active == 0, 10, message="every relay to close")


@pytest.mark.parametrize("bad", ["garbage record", "half a record then close",
                                 "plaintext", "huge record length"])
def test_bad_input_ends_in_a_clean_close(pki: Pki, node: ServerProcess,
                                         bad: str) -> None:
    with proxy_for(terminating(node, pki)) as proxy:
        port = proxy.port("t")
        sock: socket.socket = socket.create_connection((HOST, port), timeout=5)
        try:
            if bad == "plaintext":
                sock.sendall(b"GET / HTTP/1.1\r\n\r\n")
            elif bad == "huge record length":
                sock.sendall(b"\x16\x03\x03\xff\xff" + b"\x00" * 4096)
            else:
                sock = pki.client_context().wrap_socket(sock, server_hostname="localhost")
                sock.sendall(b"PING\r\n")
                assert sock.recv(100) == b"+PONG\r\n"
                # Below the TLS layer: bytes that are no valid record.
                record = b"\x17\x03\x03\x00\x20" + b"x" * 32
                os.write(sock.fileno(), record if bad == "garbage record" else record[:10])
                if bad != "garbage record":
                    with socket.socket(fileno=os.dup(sock.fileno())) as dup:
                        dup.shutdown(socket.SHUT_WR)
            with contextlib.suppress(OSError, ssl.SSLError):
                while sock.recv(4096):
                    pass
        finally:
            sock.close()
        wait_until(lambda: proxy.server.active == 0, 10, message="the relay to close")
        r = redis.Redis(port=port, ssl=True, ssl_ca_certs=str(pki.ca_file), socket_timeout=5)
        assert r.ping()  # the engine thread lives on
        r.close()


def test_without_the_tls_engine_a_native_tls_listener_uses_python_once_warned(
        pki: Pki, node: ServerProcess, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    from proxy.relay import _engine as plain  # type: ignore[attr-defined]

    monkeypatch.setattr(engine_mod, "_engine", plain)
    monkeypatch.setattr(engine_mod, "_tls_unavailable_logged", False)
    with proxy_for(terminating(node, pki)) as proxy:
        for _ in range(2):
            r = redis.Redis(port=proxy.port("t"), ssl=True, ssl_ca_certs=str(pki.ca_file),
                            socket_timeout=5)
            assert r.ping()
            relays = proxy.call(lambda: list(proxy.server.listeners["t"].relays))
            assert relays and not any(isinstance(x, NativeRelay) for x in relays)
            r.close()
    warned = [r for r in caplog.records if "needs the engine built with libssl" in
              r.getMessage()]
    assert len(warned) == 1


def test_the_build_shares_python_s_libssl(tmp_path: Path) -> None:
    import _ssl

    tls = engine_mod._engine
    assert tls.same_libssl(_ssl.__file__)
    assert tls.OPENSSL_VERSION_NUMBER == ssl.OPENSSL_VERSION_NUMBER


@pytest.mark.parametrize(("relay", "order"), [
    ("native", ("engine", "buffered")),
    ("auto", ("engine", "buffered")),
    ("python", ("buffered",)),
])
def test_which_relay_a_tls_listener_gets(relay: str, order: tuple[str, ...]) -> None:
    from proxy.relay.choose import relay_order

    for leg in ({"tls": {"cert": __file__, "key": __file__}}, {"upstream_tls": True}):
        config = make_config([{"name": "x", "listen": f"{HOST}:7000",
                               "upstream": f"{HOST}:7001", "relay": relay, **leg}])
        assert tuple(k.value for k in relay_order(config.listeners[0])) == order


@pytest.mark.parametrize(("server_name", "sni"), [("localhost", "localhost"),
                                                  ("127.0.0.1", None)])
def test_the_node_gets_sni_for_a_name_and_none_for_an_address(
        pki: Pki, server_name: str, sni: str | None) -> None:
    """As ``wrap_socket(server_hostname=...)`` does: SNI carries a name, never an address
    (the certificate is then checked against the address)."""
    from tests.upstreams import tcp_upstream

    seen: list[str | None] = []
    node_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    node_ctx.load_cert_chain(str(pki.server_cert), str(pki.server_key))
    node_ctx.sni_callback = lambda _sock, name, _ctx: seen.append(name)  # type: ignore[func-returns-value,assignment]

    def node(conn: socket.socket) -> None:
        with node_ctx.wrap_socket(conn, server_side=True) as tls:
            assert tls.recv(100) == b"PING\r\n"
            tls.sendall(b"+PONG\r\n")
            tls.recv(100)

    with tcp_upstream(node) as port, proxy_for(
            {"name": "o", "listen": f"{HOST}:0", "upstream": f"{HOST}:{port}",
             "relay": "native",
             "upstream_tls": {"ca": str(pki.ca_file), "server_name": server_name}}) as proxy, \
            socket.create_connection((HOST, proxy.port("o")), timeout=10) as sock:
        sock.sendall(b"PING\r\n")
        assert sock.recv(100) == b"+PONG\r\n"
    assert seen == [sni]


def test_reconnects_to_a_tls_node_resume_its_session(
        pki: Pki, tls_node: ServerProcess) -> None:
    """Origination keeps the node's last session (per context, name and address), so a
    reconnect storm does not cost the node full handshakes."""
    listener = {"name": "o", "listen": f"{HOST}:0", "upstream": tls_node.address,
                "relay": "native",
                "upstream_tls": {"ca": str(pki.ca_file), "server_name": "localhost"}}
    with proxy_for(listener) as proxy:
        for i in range(4):
            r = redis.Redis(port=proxy.port("o"), socket_timeout=10)
            assert r.set(f"k{i}", i)
            r.close()
            wait_until(lambda: proxy.server.active == 0, 5, message="the relay to close")
        assert engine_stats(proxy)["tls_resumed"] >= 3


def test_the_peers_certificate_expiry_reaches_the_listener(pki: Pki) -> None:
    """The notAfter of what the node and a mutual-TLS client showed at their handshakes
    (the certificate expiry gauge's peer legs), as the Python relay reads it."""
    import datetime

    node_until = datetime.datetime(2034, 4, 4, tzinfo=datetime.UTC)
    client_until = datetime.datetime(2035, 5, 5, tzinfo=datetime.UTC)
    node_cert, node_key = pki.issue("node", not_after=node_until)
    client_cert = pki.issue_client("client-2035", not_after=client_until)
    node = tls_redis(pki, node_cert, node_key)
    try:
        listener = {"name": "t", "listen": f"{HOST}:0", "upstream": node.address,
                    "relay": "native",
                    "tls": {"cert": str(pki.server_cert), "key": str(pki.server_key),
                            "client_ca": str(pki.ca_file)},
                    "upstream_tls": {"ca": str(pki.ca_file), "server_name": "localhost"}}
        with proxy_for(listener) as proxy:
            r = redis.Redis(port=proxy.port("t"), ssl=True, ssl_ca_certs=str(pki.ca_file),
                            ssl_certfile=str(client_cert), socket_timeout=10)
            assert r.ping()
            r.close()
            seen = proxy.server.listeners["t"].tls_peer_expiry
            wait_until(lambda: len(seen) == 2, 5, message="both legs' certificates")
            assert seen == {"upstream": node_until.timestamp(),
                            "client": client_until.timestamp()}
    finally:
        node.stop()


def test_handshakes_beside_connections_python_cuts_mid_handshake_end_cleanly(
        tmp_path: Path, node: ServerProcess) -> None:
    """The engine runs a handshake's public-key step outside its lock (so add(), reap()
    and stats() never wait on it), and close() waits for a step under way. Full RSA
    handshakes from several clients at once, beside connections that stop mid-handshake
    and that Python cuts at connect_timeout: every finished client is served, every
    stalled one is cut and counted, and the engine is left with nothing live."""
    import threading

    import trustme

    ca = trustme.CA(key_type=trustme.KeyType.RSA)
    cert = ca.issue_cert(HOST, key_type=trustme.KeyType.RSA)
    cert.cert_chain_pems[0].write_to_path(str(tmp_path / "rsa.pem"))
    cert.private_key_pem.write_to_path(str(tmp_path / "rsa.key"))
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    listener = {"name": "t", "listen": f"{HOST}:0", "upstream": node.address,
                "protocol": "redis", "relay": "native", "connect_timeout": 0.5,
                "tls": {"cert": str(tmp_path / "rsa.pem"), "key": str(tmp_path / "rsa.key")}}
    ctx = ssl.create_default_context(cafile=str(tmp_path / "ca.pem"))
    rounds, per_client = 3, 15
    served: list[int] = []
    errors: list[BaseException] = []

    def client() -> None:
        n = 0
        try:
            for _ in range(per_client):
                with socket.create_connection((HOST, port), timeout=10) as raw, \
                        ctx.wrap_socket(raw, server_hostname=HOST) as tls:
                    tls.sendall(b"PING\r\n")
                    assert tls.recv(16) == b"+PONG\r\n"
                    n += 1
        except (OSError, AssertionError) as exc:
            errors.append(exc)
        served.append(n)

    with proxy_for(listener) as proxy:
        port = proxy.port("t")
        for _ in range(rounds):
            stalled = [socket.create_connection((HOST, port), timeout=10) for _ in range(8)]
            for sock in stalled:  # half a ClientHello: the engine waits for the rest
                sock.sendall(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")
            clients = [threading.Thread(target=client) for _ in range(4)]
            for t in clients:
                t.start()
            for t in clients:
                t.join(60)
            for sock in stalled:  # cut by Python at connect_timeout, not by the client
                sock.settimeout(10)
                with contextlib.suppress(ConnectionResetError):
                    assert sock.recv(100) == b""
                sock.close()
        assert not errors, errors[:3]
        assert served == [per_client] * (4 * rounds)
        stats = proxy.server.listeners["t"].stats
        wait_until(lambda: stats.refused.get("tls_handshake_failed") == 8 * rounds, 10,
                   message="every stalled handshake to be counted")
        wait_until(lambda: engine_stats(proxy)["live"] == 0, 10,
                   message="the engine to hold no connection")
        # ... and the loop was told of every end (a reap during a step must not hide one)
        wait_until(lambda: proxy.server.active == 0, 10, message="every relay to be reaped")
        assert engine_stats(proxy)["tls_handshakes"] == 4 * rounds * per_client
        assert not any(engine.closed for engine in proxy.call(
            lambda: hub_for(proxy.loop).engines))  # type: ignore[arg-type]


def test_sslkeylogfile_in_the_environment_does_not_crash_origination(
        pki: Pki, tls_node: ServerProcess, tmp_path: Path) -> None:
    """SSLKEYLOGFILE makes ssl.create_default_context() log keys through a CPython
    callback that cannot serve the engine's connections (it crashed the process): the
    upstream context turns it off. In a child process, so a crash fails only this test."""
    import sys

    script = f"""
import redis
from tests.support import make_config, ProxyThread
lst = {{"name": "o", "listen": "127.0.0.1:0", "upstream": {tls_node.address!r},
       "relay": "native", "upstream_tls": {{"ca": {str(pki.ca_file)!r},
                                            "server_name": "localhost"}}}}
proxy = ProxyThread(make_config([lst])).start()
try:
    r = redis.Redis(port=proxy.port("o"), socket_timeout=10)
    print("PING", r.ping())
    r.close()
finally:
    proxy.stop()
"""
    env = {**os.environ, "SSLKEYLOGFILE": str(tmp_path / "keys.txt")}
    root = Path(__file__).resolve().parent.parent
    done = subprocess.run([sys.executable, "-c", script], env=env, cwd=root,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "PING True" in done.stdout, (done.returncode,
                                                                 done.stderr[-2000:])
