# cacheport on the NAT host:
#   docker build -t cacheport .
#   docker run -d --name cacheport --network host --restart unless-stopped \
#     -v /etc/cacheport/cacheport.yaml:/etc/cacheport/cacheport.yaml:ro cacheport
# Host networking: one port per cache node, bound straight on the host's
# interfaces, with no extra NAT layer (and no docker-proxy) in the path.

FROM python:3.11-slim AS build
# A C compiler for the native relay engine (proxy/relay/engine.c); the image itself needs none.
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml README.md ./
COPY proxy ./proxy
COPY scripts/install-venv.sh ./scripts/install-venv.sh
# The same install step the test suite runs (tests/test_packaging.py).
RUN scripts/install-venv.sh /opt/cacheport

FROM python:3.11-slim
LABEL org.opencontainers.image.title="cacheport" \
      org.opencontainers.image.description="Userspace TCP proxy replacing iptables DNAT in front of Amazon ElastiCache" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --system cacheport && useradd --system --gid cacheport --no-create-home \
      --shell /usr/sbin/nologin cacheport && mkdir -p /etc/cacheport
COPY --from=build /opt/cacheport /opt/cacheport
COPY config/example.yaml /etc/cacheport/example.yaml
ENV PATH=/opt/cacheport/bin:$PATH PYTHONUNBUFFERED=1
USER cacheport
# Ports below 1024 would need CAP_NET_BIND_SERVICE; ElastiCache ports are above it.
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
  CMD ["python", "-c", "import sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:9180/healthz', timeout=2).status == 200 else 1)"]
STOPSIGNAL SIGTERM
# Exec form: cacheport is PID 1 and receives SIGTERM (drain) and SIGHUP (reload).
ENTRYPOINT ["cacheport", "run", "-c", "/etc/cacheport/cacheport.yaml"]
