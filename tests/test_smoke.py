from __future__ import annotations

import redis

from tests.support import ServerProcess, running_proxy


def test_redis_ping_through_proxy(redis_server: ServerProcess, loop_kind: str) -> None:
    listeners = [{"name": "r", "listen": "127.0.0.1:0", "upstream": redis_server.address,
                  "protocol": "redis"}]
    with running_proxy(listeners, loop_kind) as proxy:
        client = redis.Redis(port=proxy.port("r"), socket_timeout=5)
        assert client.ping()
        client.close()
