"""The admin endpoint's pure parts: request parsing limits and who may read or write."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from proxy.admin import auth, http
from proxy.config import Address, AdminConfig
from proxy.config.values import Secret

pytestmark = pytest.mark.timeout(10)

LOOPBACK = Address("127.0.0.1", 9180)
ANYWHERE = Address("0.0.0.0", 9180)


@pytest.mark.parametrize(("head", "status"), [
    (b"hello\r\n\r\n", 400),
    (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n", 400),  # a TLS ClientHello
    (b"GET /status\r\n\r\n", 400),  # HTTP/0.9
    (b"GET status HTTP/1.1\r\n\r\n", 400),
    (b"G(T /status HTTP/1.1\r\n\r\n", 400),
    (b"GET /status HTTP/1.1\r\nno colon here\r\n\r\n", 400),
    (b"GET /status HTTP/1.1\r\nbad name: x\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\n" + b"X: " + b"a" * http.MAX_HEAD + b"\r\n\r\n", 431),
])
def test_malformed_heads_get_a_status_not_an_exception(head: bytes, status: int) -> None:
    with pytest.raises(http.Malformed) as caught:
        http.parse_head(head)
    assert caught.value.response.status == status
    assert b"no colon" not in caught.value.response.body  # header lines are never echoed


def test_a_request_head_parses_into_method_path_query_and_headers() -> None:
    request = http.parse_head(b"head /metrics?listener=a HTTP/1.1\r\nHost: x\r\n"
                              b"Authorization:  Bearer t \r\n\r\n")
    assert (request.method, request.path, request.query) == ("HEAD", "/metrics", "listener=a")
    assert request.headers == {"host": "x", "authorization": "Bearer t"}


@pytest.mark.parametrize(("headers", "outcome"), [
    ({}, 0), ({"content-length": "12"}, 12),
    ({"content-length": str(1 << 30)}, 413), ({"content-length": "-1"}, 400),
    ({"content-length": "9" * 40}, 400), ({"transfer-encoding": "chunked"}, 501),
])
def test_bodies_are_bounded_before_a_byte_of_them_is_read(headers: dict[str, str],
                                                          outcome: int) -> None:
    if outcome < 100:
        assert http.body_length(headers) == outcome
        return
    with pytest.raises(http.Malformed) as caught:
        http.body_length(headers)
    assert caught.value.response.status == outcome


def test_writes_need_the_token_when_one_is_set_wherever_the_endpoint_listens() -> None:
    config = AdminConfig(token=Secret("s3cret"))
    for bound in (LOOPBACK, ANYWHERE):
        assert auth.check_write(config, bound, None) is auth.NO_TOKEN
        assert auth.check_write(config, bound, "Basic czNjcmV0") is auth.NO_TOKEN
        assert auth.check_write(config, bound, "Bearer nope") is auth.BAD_TOKEN
        assert auth.check_write(config, bound, "Bearer s3cret") is None
        assert auth.check_write(config, bound, "bearer  s3cret ") is None
    for refusal in (auth.NO_TOKEN, auth.BAD_TOKEN, auth.TOKEN_REQUIRED):
        assert "s3cret" not in refusal.text


def test_without_a_token_writes_pass_on_loopback_only_unless_opted_out() -> None:
    assert auth.check_write(AdminConfig(), LOOPBACK, None) is None
    assert auth.check_write(AdminConfig(), ANYWHERE, None) is auth.TOKEN_REQUIRED
    assert auth.check_write(AdminConfig(), Address("::", 9180), "Bearer x") is \
        auth.TOKEN_REQUIRED
    assert auth.check_write(AdminConfig(insecure_writes=True), ANYWHERE, None) is None


def test_allow_matches_sources_v4_mapped_v6_included() -> None:
    config = AdminConfig(allow=(ipaddress.ip_network("192.0.2.0/24"),
                                ipaddress.ip_network("2001:db8::/32")))
    assert auth.source_allowed("192.0.2.9", config)
    assert auth.source_allowed("::ffff:192.0.2.9", config)
    assert auth.source_allowed("2001:db8::1", config)
    assert not auth.source_allowed("127.0.0.1", config)
    assert not auth.source_allowed("", config)
    assert auth.source_allowed("203.0.113.1", AdminConfig())  # no list: every source


@pytest.mark.parametrize("pretty", [False, True])
def test_status_json_in_slices_is_the_same_text_as_one_dumps(pretty: bool) -> None:
    import asyncio
    import json

    from proxy.admin.status import Slicer, json_parts

    for doc in ({"version": "1", "listeners": [{"a": [1, {"b": None}]}, {"c": "<d>"}],
                 "clusters": [], "admin": {"writes": "token"}},
                {"listeners": []}, {"listeners": [{"a": 1}]}, {"ready": True}):
        text = b"".join(asyncio.run(json_parts(doc, Slicer(budget=0), pretty))).decode()
        assert text == json.dumps(doc, indent=2 if pretty else None) + "\n"


MAP = """\
admin:
  listen: 0.0.0.0:9180
  allow: [10.0.0.0/16]
  {token}
listeners:
  - {{name: a, listen: 127.0.0.1:6390, upstream: 10.0.0.1:6379, health: off}}
"""


def test_the_token_comes_from_the_environment_or_a_file_and_never_shows(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from proxy.config import ConfigError, load_config

    folder = tmp_path
    monkeypatch.setenv("ADMIN_TOKEN", "from-the-env-123")
    path = folder / "map.yaml"
    path.write_text(MAP.format(token="token: ${ADMIN_TOKEN}"))
    admin = load_config(str(path)).admin
    assert admin is not None and admin.token is not None
    assert admin.token.reveal() == "from-the-env-123"
    assert "from-the-env-123" not in repr(admin) and admin.allow is not None
    (folder / "admin.token").write_text("from-a-file-456\n")
    path.write_text(MAP.format(token="token_file: admin.token"))
    admin = load_config(str(path)).admin
    assert admin is not None and admin.token is not None
    assert admin.token.reveal() == "from-a-file-456"
    path.write_text(MAP.format(token="token_file: admin.token\n  token: ${ADMIN_TOKEN}"))
    with pytest.raises(ConfigError, match="give only one of token and token_file") as caught:
        load_config(str(path))
    assert "from-the-env-123" not in str(caught.value)
    path.write_text(MAP.format(token="token_file: nowhere.token"))
    with pytest.raises(ConfigError, match="admin: field 'token_file': no such file"):
        load_config(str(path))
