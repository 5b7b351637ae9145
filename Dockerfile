# cacheport on the NAT host (docs/container.md has the whole guide; deploy/compose.yaml
# the same settings):
#   docker build -t cacheport .
#   docker run -d --name cacheport --network host --restart unless-stopped \
#     --read-only --stop-timeout 45 --ulimit nofile=65536:65536 \
#     -v /etc/cacheport:/etc/cacheport:ro \
#     -v cacheport-state:/var/lib/cacheport \
#     cacheport
# Host networking: one port per cache node, bound straight on the host's
# interfaces, with no extra NAT layer (and no docker-proxy) in the path.
# Podman/buildah keep the HEALTHCHECK only in the Docker image format: build with
# `podman build --format docker`.
#
# BASE_IMAGE: any Debian-based image with Python >= 3.11 and its venv module (a mirror
# of the official one, a pinned digest, or Debian's python3 + python3-venv); both
# stages use it, so the venv built in the first runs in the second.
ARG BASE_IMAGE=python:3.11-slim

FROM ${BASE_IMAGE} AS build
# A C compiler for the native relay engine (proxy/relay/engine.c), and the Python headers
# where the base lacks them (the official image has them; Debian's python3 does not).
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && if ! python3 -c 'import os, sys, sysconfig; sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))'; \
       then apt-get install -y --no-install-recommends python3-dev; fi \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml README.md ./
COPY scripts/install-venv.sh scripts/image-constraints.txt ./scripts/
COPY proxy ./proxy
# The same install step the test suite runs (tests/test_packaging.py), with pip and the

# an image that fell back to the Python relays must not build.
RUN PIP_CONSTRAINT=/src/scripts/image-constraints.txt \
    PIP_BUILD_CONSTRAINT=/src/scripts/image-constraints.txt PIP_NO_CACHE_DIR=1 \
        scripts/install-venv.sh /opt/cacheport \
    && { /opt/cacheport/bin/python -I -c 'import proxy.relay._engine' \
         || { echo "the native relay engine did not build (see the compiler output above)" >&2; \
              exit 1; }; } \
    && /opt/cacheport/bin/python -m pip uninstall -q -y setuptools pip \
    && find /opt/cacheport -name '*.so' -exec strip --strip-unneeded {} +

FROM ${BASE_IMAGE}
LABEL org.opencontainers.image.title="cacheport" \
      org.opencontainers.image.description="Userspace TCP proxy replacing iptables DNAT in front of Amazon ElastiCache" \
      org.opencontainers.image.licenses="Apache-2.0"
# A fixed uid/gid (10001), so the owner a mounted map must be readable by is known in
# advance; /var/lib/cacheport is the state_dir of the image's maps (cluster port
# assignments), the one directory it writes, and a volume.
RUN groupadd --system --gid 10001 cacheport \
    && useradd --system --uid 10001 --gid cacheport --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin cacheport \
    && install -d -m 0755 /etc/cacheport \
    && install -d -o cacheport -g cacheport -m 0750 /var/lib/cacheport
COPY --from=build /opt/cacheport /opt/cacheport
COPY config/container.yaml /etc/cacheport/example.yaml
ENV PATH=/opt/cacheport/bin:$PATH PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
VOLUME ["/var/lib/cacheport"]
# Numeric, so Kubernetes' runAsNonRoot can check it. Ports below 1024 would need
# CAP_NET_BIND_SERVICE; ElastiCache ports are above it.
USER 10001:10001
# Reads the same map and asks the admin endpoint wherever admin.listen puts it (and says
# what it does under admin: off); exit 0 healthy, 1 not.
HEALTHCHECK --interval=10s --timeout=5s --start-period=10s --retries=3 \
  CMD ["cacheport", "healthcheck", "-c", "/etc/cacheport/cacheport.yaml"]
STOPSIGNAL SIGTERM
# Exec form: cacheport is PID 1 and receives SIGTERM (drain) and SIGHUP (reload).
ENTRYPOINT ["cacheport", "run", "-c", "/etc/cacheport/cacheport.yaml"]
