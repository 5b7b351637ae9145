"""The ClientHello reader: real hellos (Python's ssl, openssl s_client), split and bent."""

from __future__ import annotations

import shutil
import socket
import ssl
import subprocess

import pytest

from proxy.protocols import tls_hello
from proxy.protocols.tls_hello import ClientHello, HelloError, parse

NAME = "node-0001.abc123.use1.cache.amazonaws.com"


def python_hello(server_hostname: str | None = NAME,
                 version: ssl.TLSVersion | None = None) -> bytes:
    """The first flight of Python's TLS client, as it would go on the wire."""
    ctx = ssl.create_default_context()
    if server_hostname is None:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if version is not None:
        ctx.minimum_version = ctx.maximum_version = version
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ctx.wrap_bio(incoming, outgoing, server_hostname=server_hostname)
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


def openssl_hello(*args: str) -> bytes:
    """What ``openssl s_client`` sends first, read by a socket that then closes."""
    binary = shutil.which("openssl")
    if binary is None:
        pytest.skip("openssl(1) is not installed")
    with socket.create_server(("127.0.0.1", 0)) as server:
        server.settimeout(10)
        port = server.getsockname()[1]
        proc = subprocess.Popen([binary, "s_client", "-connect", f"127.0.0.1:{port}", *args],
                                stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        try:
            conn, _ = server.accept()
            with conn:
                conn.settimeout(10)
                data = b""
                while parse(data) is None:
                    chunk = conn.recv(1 << 16)
                    assert chunk, "s_client closed before its ClientHello was whole"
                    data += chunk
                return data
        finally:
            proc.kill()
            proc.wait(10)
            assert proc.stdin is not None
            proc.stdin.close()


def records(hello: bytes, size: int) -> bytes:
    """The same handshake message re-cut into records of ``size`` bytes of fragment."""
    assert hello[0] == 22
    return cut(hello[5:], size)


def cut(body: bytes, size: int) -> bytes:
    """Handshake bytes in records of ``size`` bytes of fragment."""
    return b"".join(bytes([22, 3, 1]) + len(body[i:i + size]).to_bytes(2, "big")
                    + body[i:i + size] for i in range(0, len(body), size))


@pytest.mark.parametrize("version", [None, ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
def test_pythons_hello_names_its_server(version: ssl.TLSVersion | None) -> None:
    hello = python_hello(version=version)
    assert parse(hello) == ClientHello(NAME, len(hello))
    assert parse(hello + b"\x17\x03\x03") == ClientHello(NAME, len(hello))  # what follows


def test_a_name_is_read_in_lower_case() -> None:
    assert parse(python_hello("Node-1.Example.COM")) == ClientHello(
        "node-1.example.com", len(python_hello("Node-1.Example.COM")))


def test_a_hello_without_server_name_says_so() -> None:
    hello = python_hello(None)
    assert parse(hello) == ClientHello(None, len(hello))


@pytest.mark.parametrize("args", [["-servername", NAME], ["-servername", NAME, "-tls1_2"],
                                  ["-noservername"]], ids=["tls1.3", "tls1.2", "no-sni"])
def test_openssl_s_clients_hello(args: list[str]) -> None:
    hello = openssl_hello(*args)
    assert parse(hello) == ClientHello(None if "-noservername" in args else NAME, len(hello))


def test_every_prefix_of_a_hello_asks_for_more() -> None:
    hello = python_hello()
    assert all(parse(hello[:n]) is None for n in range(len(hello)))


@pytest.mark.parametrize("size", [1, 3, 50, 255])
def test_a_hello_split_across_records_is_read_whole(size: int) -> None:
    split = records(python_hello(), size)
    assert parse(split) == ClientHello(NAME, len(split))
    assert all(parse(split[:n]) is None for n in range(0, len(split), 7))


def test_plaintext_and_http_are_not_tls() -> None:
    for data in (b"PING\r\n", b"GET / HTTP/1.1\r\n", b"*1\r\n$4\r\nPING\r\n", b"\x80\x2e\x01"):
        with pytest.raises(HelloError) as err:
            parse(data)
        assert err.value.reason == "not_tls"
    with pytest.raises(HelloError, match="version 2"):
        parse(b"\x16\x02")


def _extensions(hello: bytes) -> tuple[int, int]:
    """Where the extensions vector's length sits, and where it ends, in a one-record hello."""
    pos = 5 + 4 + 2 + 32
    pos += 1 + hello[pos]  # session id
    pos += 2 + int.from_bytes(hello[pos:pos + 2], "big")  # cipher suites
    pos += 1 + hello[pos]  # compression methods
    return pos, pos + 2 + int.from_bytes(hello[pos:pos + 2], "big")


def _with_extension(hello: bytes, extension: bytes) -> bytes:
    """``hello`` with one more extension at the end, every length fixed up."""
    at, end = _extensions(hello)
    assert end == len(hello)
    body = bytearray(hello + extension)
    grow = len(extension)
    for offset, width in ((3, 2), (6, 3), (at, 2)):
        value = int.from_bytes(body[offset:offset + width], "big") + grow
        body[offset:offset + width] = value.to_bytes(width, "big")
    return bytes(body)


def _sni_extension(*names: tuple[int, bytes]) -> bytes:
    entries = b"".join(bytes([kind]) + len(n).to_bytes(2, "big") + n for kind, n in names)
    data = len(entries).to_bytes(2, "big") + entries
    return b"\x00\x00" + len(data).to_bytes(2, "big") + data


@pytest.mark.parametrize(("extension", "why"), [
    (_sni_extension((0, b"x.example.com")), "extension 0 twice"),
    (b"\x00\x0b\x00\x05", "runs past"),
])
def test_broken_extensions_are_malformed(extension: bytes, why: str) -> None:
    hello = _with_extension(python_hello(), extension)
    with pytest.raises(HelloError, match=why) as err:
        parse(hello)
    assert err.value.reason == "client_hello_malformed"


@pytest.mark.parametrize(("names", "why"), [
    (((0, b"a.example.com"), (0, b"b.example.com")), "two host_name"),
    (((0, b"bad name.example.com"),), "not a DNS name"),
    (((0, b"-x.example.com"),), "not a DNS name"),
    (((0, b"x.example.com."),), "not a DNS name"),
    (((0, "n\u00e4me.com".encode()),), "not ASCII"),
    (((1, b"other-type"),), "without a host_name"),
])
def test_bad_server_names_are_malformed(names: tuple[tuple[int, bytes], ...], why: str) -> None:
    hello = _with_extension(python_hello(None), _sni_extension(*names))
    with pytest.raises(HelloError, match=why):
        parse(hello)


def test_a_future_name_type_beside_a_host_name_is_skipped() -> None:
    hello = _with_extension(python_hello(None), _sni_extension((7, b"?"), (0, b"a.b.c")))
    assert parse(hello) == ClientHello("a.b.c", len(hello))


def test_other_records_or_messages_are_malformed() -> None:
    hello = python_hello()
    for data, why in ((b"\x16\x03\x01\x00\x04\x02\x00\x00\x00", "not a ClientHello"),
                      (b"\x16\x03\x01\x00\x00", "handshake record of 0 bytes"),
                      (b"\x16\x03\x01\x40\x01", "handshake record of 16385 bytes"),
                      (records(hello, 100)[:105] + b"\x17\x03\x03\x00\x01x", "record type 23"),
                      (hello[:5] + b"\x01\x00\x00\x26" + hello[9:47], "runs past")):
        fixed = data
        if why == "runs past":  # a whole message whose fields overrun it
            fixed = b"\x16\x03\x01\x00\x2a" + data[5:47]
        with pytest.raises(HelloError, match=why) as err:
            parse(fixed)
        assert err.value.reason == "client_hello_malformed"


def test_a_hello_over_the_limit_is_refused_as_soon_as_it_says_so() -> None:
    # A handshake header announcing 20,000 bytes: refused before they arrive.
    with pytest.raises(HelloError) as err:
        parse(b"\x16\x03\x01\x00\x04\x01\x00\x4e\x20")
    assert err.value.reason == "client_hello_too_large"
    # Records that keep coming without completing the hello: refused at the limit.
    body = python_hello()[5:]
    padded = b"\x01\x00\x50\x00" + body[4:] + bytes(20000)
    stream = cut(padded, 1000)
    with pytest.raises(HelloError) as err:
        parse(stream[:tls_hello.MAX_HELLO + 10])
    assert err.value.reason == "client_hello_too_large"
    assert parse(python_hello(), limit=len(python_hello())) is not None
    with pytest.raises(HelloError):
        parse(python_hello(), limit=len(python_hello()) - 1)
