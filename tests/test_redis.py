"""redis-py through cacheport against a real redis-server."""

from __future__ import annotations

import os
import threading

import redis

from tests.support import ServerProcess, running_proxy, wait_until


def rd_listener(server: ServerProcess) -> list[dict[str, object]]:
    return [{"name": "rd", "listen": "127.0.0.1:0", "upstream": server.address,
             "protocol": "redis"}]


def client(port: int) -> redis.Redis:
    return redis.Redis(port=port, socket_timeout=30, socket_connect_timeout=5)


def test_set_get_and_ten_thousand_command_pipeline(
    redis_server: ServerProcess, loop_kind: str
) -> None:
    with running_proxy(rd_listener(redis_server), loop_kind) as proxy:
        r = client(proxy.port("rd"))
        assert r.set("greeting", "hello")
        assert r.get("greeting") == b"hello"
        pipe = r.pipeline(transaction=False)
        for i in range(10_000):
            pipe.set(f"k{i}", i)
        assert all(pipe.execute())
        pipe = r.pipeline(transaction=False)
        for i in range(10_000):
            pipe.get(f"k{i}")
        assert pipe.execute() == [str(i).encode() for i in range(10_000)]
        r.close()


def test_sixteen_megabyte_value_round_trips_byte_exact(redis_server: ServerProcess) -> None:
    value = os.urandom(16 << 20)
    with running_proxy(rd_listener(redis_server)) as proxy:
        r = client(proxy.port("rd"))
        assert r.set("big", value)
        assert r.get("big") == value
        r.close()


def test_pubsub_through_two_proxied_connections(redis_server: ServerProcess) -> None:
    with running_proxy(rd_listener(redis_server)) as proxy:
        subscriber = client(proxy.port("rd"))
        publisher = client(proxy.port("rd"))
        pubsub = subscriber.pubsub()
        pubsub.subscribe("news")
        first = pubsub.get_message(timeout=5)
        assert first is not None and first["type"] == "subscribe"
        wait_until(lambda: publisher.pubsub_numsub("news")[0][1] == 1, 5,
                   message="the subscription to register")
        received: list[bytes] = []
        for i in range(100):
            assert publisher.publish("news", f"item {i}") == 1
        while len(received) < 100:
            message = pubsub.get_message(timeout=5)
            assert message is not None, f"only {len(received)} messages arrived"
            if message["type"] == "message":
                received.append(message["data"])
        assert received == [f"item {i}".encode() for i in range(100)]
        pubsub.close()
        subscriber.close()
        publisher.close()


def test_two_hundred_concurrent_clients(redis_server: ServerProcess) -> None:
    errors: list[str] = []
    with running_proxy(rd_listener(redis_server)) as proxy:
        port = proxy.port("rd")

        def worker(n: int) -> None:
            r = client(port)
            try:
                for i in range(100):
                    key = f"c{n}:{i}"
                    r.set(key, f"{n}-{i}")
                    if r.get(key) != f"{n}-{i}".encode():
                        errors.append(f"{key} mismatch")
                if r.incrby(f"sum{n}", 100) != 100:
                    errors.append(f"sum{n}")
            except redis.RedisError as exc:
                errors.append(f"client {n}: {exc}")
            finally:
                r.close()

        threads = [threading.Thread(target=worker, args=(n,)) for n in range(200)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not any(t.is_alive() for t in threads)
    assert errors == []
