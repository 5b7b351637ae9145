"""pymemcache through cacheport against a real memcached."""

from __future__ import annotations

import os

from pymemcache.client.base import Client

from tests.support import ServerProcess, running_proxy


def mc_listener(server: ServerProcess) -> list[dict[str, object]]:
    return [{"name": "mc", "listen": "127.0.0.1:0", "upstream": server.address,
             "protocol": "memcached"}]


def client(port: int) -> Client:
    return Client(("127.0.0.1", port), connect_timeout=5, timeout=10, no_delay=True)


def test_ten_thousand_keys_set_and_get(memcached: ServerProcess, loop_kind: str) -> None:
    with running_proxy(mc_listener(memcached), loop_kind) as proxy:
        mc = client(proxy.port("mc"))
        for i in range(10_000):
            mc.set(f"key:{i}", f"value-{i}".encode())
        for i in range(10_000):
            assert mc.get(f"key:{i}") == f"value-{i}".encode()
        many = mc.get_many([f"key:{i}" for i in range(0, 10_000, 7)])
        assert len(many) == len(range(0, 10_000, 7))
        mc.close()
    direct = client(memcached.port)
    assert direct.get("key:9999") == b"value-9999"  # it really went to the server
    direct.close()


def test_one_megabyte_value_round_trips_byte_exact(memcached: ServerProcess) -> None:
    value = os.urandom(1 << 20)
    with running_proxy(mc_listener(memcached)) as proxy:
        mc = client(proxy.port("mc"))
        assert mc.set("big", value)
        assert mc.get("big") == value
        mc.close()


def test_gets_cas_and_incr(memcached: ServerProcess) -> None:
    with running_proxy(mc_listener(memcached)) as proxy:
        mc = client(proxy.port("mc"))
        mc.set("counter", b"10")
        assert mc.incr("counter", 5) == 15
        assert mc.decr("counter", 3) == 12
        value, token = mc.gets("counter")
        assert value == b"12"
        assert mc.cas("counter", b"100", token) is True
        assert mc.cas("counter", b"200", token) is False  # stale token
        assert mc.get("counter") == b"100"
        assert mc.version().startswith(b"1.")
        mc.close()
