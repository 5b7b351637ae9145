#!/usr/bin/env bash
# Installs what cacheport's demo and tests need on a Debian/Ubuntu machine.
# CACHEPORT_SETUP=demo (scripts/demo.sh): apt packages memcached, redis-server,
# redis-tools, python3-venv, netcat, and gcc with the Python and libssl headers for the
# native relay engine and its TLS; a virtualenv in .venv; cacheport itself.
# CACHEPORT_SETUP=test (the default, scripts/test.sh) adds iproute2 and iptables for the
# network-namespace tests, haproxy, the test extras, and the optional tools of some tests
# (a container engine, Prometheus, a browser, Redis's own test suite).
# Sourced by scripts/demo.sh and scripts/test.sh; safe to run again.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${CACHEPORT_VENV:-$ROOT/.venv}
SETUP=${CACHEPORT_SETUP:-test}
APT_PACKAGES=(memcached redis-server redis-tools python3-venv netcat-openbsd
              gcc libc6-dev python3-dev libssl-dev)
if [ "$SETUP" = demo ]; then
    EXTRAS=${CACHEPORT_EXTRAS:-}
else
    APT_PACKAGES+=(iproute2 iptables haproxy)
    EXTRAS=${CACHEPORT_EXTRAS:-dev}
fi

say() { printf '==> %s\n' "$*" >&2; }
die() { printf 'cacheport setup: %s\n' "$*" >&2; exit 1; }

missing_commands() {
    local missing=()
    command -v memcached >/dev/null 2>&1 || missing+=(memcached)
    command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
    command -v redis-cli >/dev/null 2>&1 || missing+=(redis-cli)
    command -v python3 >/dev/null 2>&1 || missing+=(python3)
    if [ "$SETUP" != demo ]; then
        command -v ip >/dev/null 2>&1 || missing+=(ip)
        command -v haproxy >/dev/null 2>&1 || missing+=(haproxy)
    fi
    printf '%s\n' "${missing[@]}"
}

# What the native relay engine is built with; without them cacheport still installs and
# uses the Python relays, so these are asked of apt-get but never required.
missing_build_tools() {
    local missing=()
    command -v cc >/dev/null 2>&1 || missing+=(cc)
    python3 -c 'import os, sysconfig, sys
sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))' \
        2>/dev/null || missing+=(Python.h)
    # The engine's TLS (proxy/relay/tls_engine.c); without it TLS stays on the Python relay.
    [ -e /usr/include/openssl/ssl.h ] || missing+=(openssl/ssl.h)
    printf '%s\n' "${missing[@]}"
}

install_system_packages() {
    local missing
    missing=$(missing_commands)
    if [ -z "$missing" ] && python3 -c 'import venv, ensurepip' >/dev/null 2>&1 \
            && [ -z "$(missing_build_tools)" ]; then
        return 0
    fi
    local needed=1  # 0: only the (optional) build tools are missing
    if [ -z "$missing" ] && python3 -c 'import venv, ensurepip' >/dev/null 2>&1; then
        needed=0
    fi
    if ! command -v apt-get >/dev/null 2>&1; then
        [ "$needed" -eq 0 ] && return 0  # install_venv says what the build tools were for
        die "missing: ${missing//$'\n'/ } (and Python's venv module if absent).
Install them with your package manager -- memcached, redis-server, redis-cli,
Python >= 3.11 with venv -- then run this command again."
    fi
    local sudo=()
    if [ "$(id -u)" -ne 0 ]; then
        if ! command -v sudo >/dev/null 2>&1 && [ "$needed" -eq 0 ]; then
            return 0
        fi
        command -v sudo >/dev/null 2>&1 || die "need root to apt-get install ${APT_PACKAGES[*]}; run as root or install sudo"
        sudo=(sudo)
    fi
    say "installing ${APT_PACKAGES[*]} with apt-get"
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        "${APT_PACKAGES[@]}" >/dev/null
    # The Debian packages start system-wide services; cacheport's demo and
    # tests start their own on other ports, so these are left as they are.
    missing=$(missing_commands)
    [ -z "$missing" ] || die "still missing after apt-get: ${missing//$'\n'/ }"
}

# The bench's peers: HAProxy (python -m bench run, and scale's check CPU), and for
# python -m bench tls also stunnel and nginx's stream module: only with
# CACHEPORT_BENCH_PEERS=1, and never required -- the bench skips a peer that is not
# installed.
install_bench_peers() {
    [ "${CACHEPORT_BENCH_PEERS:-0}" = 1 ] || return 0
    local peers=()
    command -v haproxy >/dev/null 2>&1 || [ -x /usr/sbin/haproxy ] || peers+=(haproxy)
    command -v stunnel4 >/dev/null 2>&1 || peers+=(stunnel4)
    command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || peers+=(nginx-light)
    [ -e /usr/lib/nginx/modules/ngx_stream_module.so ] || peers+=(libnginx-mod-stream)
    [ ${#peers[@]} -gt 0 ] || return 0
    local sudo=()
    [ "$(id -u)" -eq 0 ] || sudo=(sudo)
    if ! command -v apt-get >/dev/null 2>&1 \
            || { [ ${#sudo[@]} -gt 0 ] && ! command -v sudo >/dev/null 2>&1; }; then
        say "CACHEPORT_BENCH_PEERS=1: cannot apt-get install ${peers[*]} here; the bench skips them"
        return 0
    fi
    say "installing ${peers[*]} for the bench (CACHEPORT_BENCH_PEERS=1)"
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
        --no-install-recommends "${peers[@]}" >/dev/null \
        || say "installing ${peers[*]} failed; the bench skips them"
}

check_python() {
    python3 - <<'PY' || die "Python >= 3.11 is required (found $(python3 --version 2>&1))"
import sys
raise SystemExit(0 if sys.version_info >= (3, 11) else 1)
PY
}

install_venv() {
    local stamp="$VENV/.cacheport-installed" extras_ok=1
    # The demo needs no extras: any install will do. Otherwise the stamp names the extras.
    [ -z "$EXTRAS" ] || grep -qx "$EXTRAS" "$stamp" 2>/dev/null || extras_ok=0
    # The native engine is built in place by the editable install: rebuild when its source
    # changes or the built module is missing.
    if [ ! -f "$stamp" ] || [ "$ROOT/pyproject.toml" -nt "$stamp" ] || [ "$extras_ok" = 0 ] \
            || [ -n "$(find "$ROOT/proxy" -name "*.[ch]" -newer "$stamp")" ] \
            || ! compgen -G "$ROOT/proxy/relay/_engine*.so" >/dev/null; then
        say "installing cacheport${EXTRAS:+[$EXTRAS]} into $VENV"
        "$ROOT/scripts/install-venv.sh" "$VENV" "$EXTRAS" --editable \
            || die "installing into $VENV failed (see above); PyPI must be reachable"
        echo "$EXTRAS" > "$stamp"
    fi
    "$VENV/bin/python" -c 'import proxy.relay._engine' 2>/dev/null \
        || say "the native relay engine was not built (no C compiler or Python headers?):" \
               "listeners use the Python relays, and its tests are skipped"
}

install_system_packages
install_bench_peers
check_python
install_venv
export PATH="$VENV/bin:$PATH"
if [ "$SETUP" = demo ]; then
    return 0 2>/dev/null || exit 0  # sourced by scripts/demo.sh: the rest is for the tests
fi
# Optional: a valkey-server for the engine tests (scripts/valkey.sh); without it they skip.
"$ROOT/scripts/valkey.sh" >/dev/null 2>&1 \
    || say "no valkey-server to be had here: the Valkey runs of the engine tests are skipped"

# --- Optional tools for some tests ---------------------------------------------------
# install_optional FOR "COMMANDS" PACKAGES...: apt-get install PACKAGES when one of
# COMMANDS is missing. Never fatal: where they cannot be installed (no apt-get, not root)
# or apt-get fails, the tests FOR names are skipped with that reason -- except under
# CI=true, where they fail.
install_optional() {
    local why=$1 cmds missing=() cmd
    read -ra cmds <<<"$2"
    shift 2
    for cmd in "${cmds[@]}"; do
        command -v "$cmd" >/dev/null 2>&1 || missing+=("$cmd")
    done
    [ "${#missing[@]}" -eq 0 ] && return 0
    if ! command -v apt-get >/dev/null 2>&1 || [ "$(id -u)" -ne 0 ]; then
        say "not installed: ${missing[*]} (installing them needs root and apt-get): $why" \
            "will be skipped"
        return 0
    fi
    say "installing $* with apt-get (for $why)"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq || say "apt-get update failed; trying anyway"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" \
        >/dev/null || say "apt-get could not install $*: $why will be skipped"
}

# The container engine for tests/test_container.py: podman (rootful, daemonless), runc,
# mmdebstrap (the tests' base image, from the Debian mirror apt uses) and docker-compose
# (validates deploy/compose.yaml; needs no daemon). Command = Debian package here.
install_optional tests/test_container.py "podman runc mmdebstrap docker-compose" \
    podman runc mmdebstrap docker-compose

# Prometheus and promtool (Debian package prometheus) for tests/test_alert_rules.py and
# tests/test_prometheus.py: the rules in deploy/prometheus and the dashboard in
# deploy/grafana are checked against a real Prometheus. The package's own service, where
# systemd starts it, listens on :9090; the tests start their own on a free port.
install_optional "the alert rule and dashboard tests" "promtool prometheus" prometheus

# A browser for tests/test_status_page.py: Debian's chromium and chromium-driver (selenium
# drives it from the dev extra; it never downloads a browser or driver of its own).
install_optional "the status page's browser test" "chromium chromedriver" \
    chromium chromium-driver fonts-dejavu-core

# Redis Cluster clients in other languages for tests/test_cluster_clients.py, all from
# Debian: Ruby's redis gem, PHP's phpredis (RedisCluster) and node-redis (createCluster).
# They are libraries, not commands: the word below stands for all three.
cluster_clients=$({ ruby -e 'require "redis"' && php -r 'exit(class_exists("RedisCluster") ? 0 : 1);' \
    && NODE_PATH=/usr/share/nodejs node -e 'require("redis")'; } >/dev/null 2>&1 \
    || echo ruby-php-node-redis-clients)
install_optional "the other-language cluster client tests" "$cluster_clients" \
    ruby-redis php-cli php-redis node-redis
# --- end of the optional tools block --------------------------------------------------

# ---------------------------------------------------------------------------
# Redis's own Tcl test suite, for the conformance run (docs/conformance.md): it comes from
# the distribution's source package of the installed redis-server, so apt needs a deb-src
# entry for the mirror redis-server came from, dpkg-dev to unpack it, tcl to run it, tcl-tls and
# openssl for its --tls runs. Fetching the source is bench/conformance.py's job (into
# ~/.cache/cacheport). Never fatal here: without these the conformance test says what is
# missing, and fails under CI=true.
SUITE_PACKAGES=(tcl tcl-tls dpkg-dev openssl)
SUITE_SOURCES=/etc/apt/sources.list.d/cacheport-deb-src

have_redis_source() {
    local out
    out=$(apt-cache showsrc redis 2>/dev/null || true)
    grep -q '^Package: redis' <<<"$out"
}

# The mirror URIs apt knows redis-server from (the installed version's among them).
redis_mirrors() {
    { apt-cache policy redis-server 2>/dev/null || true; } \
        | awk '/^ +[0-9]+ [a-z+]+:\/\// { print $2 }' | sort -u
}

# Copy every deb entry for those mirrors (deb822 .sources and one-line .list) as deb-src.
write_deb_src() {
    local uris=$1 files=() f
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.sources /etc/apt/sources.list.d/*.list; do
        [ -f "$f" ] && [[ "$f" != "$SUITE_SOURCES".* ]] && files+=("$f")
    done
    [ "${#files[@]}" -gt 0 ] || return 0
    awk -v uris="$(tr '\n' ' ' <<<"$uris")" -v out="$SUITE_SOURCES" '
        function flush() {
            if (hit && deb && stanza !~ /\nEnabled: *no/) {
                sub(/^Types:[^\n]*/, "Types: deb-src", stanza)
                gsub(/\nTypes:[^\n]*/, "\nTypes: deb-src", stanza)
                printf "%s\n", stanza > (out ".sources")
            }
            stanza = ""; hit = 0; deb = 0
        }
        BEGIN { n = split(uris, u, " "); for (i = 1; i <= n; i++) want[u[i]] = 1 }
        FNR == 1 { flush() }
        FILENAME ~ /\.sources$/ {
            if ($0 ~ /^[ \t]*$/) { flush(); next }
            if ($0 ~ /^#/) next
            stanza = stanza $0 "\n"
            if (tolower($1) == "uris:") for (i = 2; i <= NF; i++) if ($i in want) hit = 1
            if (tolower($1) == "types:") for (i = 2; i <= NF; i++) if ($i == "deb") deb = 1
            next
        }
        /^deb[ \t]/ {
            line = $0; sub(/^deb/, "deb-src", line)
            for (i = 2; i <= NF; i++) if ($i in want) { print line > (out ".list"); break }
        }
        END { flush() }' "${files[@]}"
}

install_redis_suite_deps() {
    local missing=() p
    for p in tclsh:tcl dpkg-source:dpkg-dev openssl:openssl; do
        command -v "${p%%:*}" >/dev/null 2>&1 || missing+=("${p#*:}")
    done
    if command -v tclsh >/dev/null 2>&1 \
            && ! echo 'exit [catch {package require tls}]' | tclsh >/dev/null 2>&1; then
        missing+=(tcl-tls)
    fi
    have_redis_source && [ "${#missing[@]}" -eq 0 ] && return 0
    have_redis_source || missing+=("a deb-src entry for redis-server's mirror")
    if ! command -v apt-get >/dev/null 2>&1 || [ "$(id -u)" -ne 0 ]; then
        say "the conformance run (docs/conformance.md) is missing: ${missing[*]};" \
            "as root, scripts/bootstrap.sh adds them. Its test skips (and fails under CI=true)"
        return 0
    fi
    if ! have_redis_source && ! compgen -G "$SUITE_SOURCES.*" >/dev/null; then
        local uris
        uris=$(redis_mirrors)
        if [ -z "$uris" ]; then
            say "cannot tell which mirror redis-server came from (apt-cache policy" \
                "redis-server); add a deb-src entry for it by hand for the conformance run"
        else
            say "adding deb-src entries for $(tr '\n' ' ' <<<"$uris")in $SUITE_SOURCES.*"
            write_deb_src "$uris"
        fi
    fi
    say "installing ${SUITE_PACKAGES[*]} and apt's source index for the conformance run"
    env DEBIAN_FRONTEND=noninteractive apt-get update -qq \
        || say "apt-get update failed; the conformance run may not find redis's source"
    env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        "${SUITE_PACKAGES[@]}" >/dev/null \
        || say "apt-get install ${SUITE_PACKAGES[*]} failed; the conformance run needs them"
    have_redis_source \
        || say "apt has no source package for redis even now; the conformance run cannot fetch" \
               "the suite (see $SUITE_SOURCES.*)"
}

install_redis_suite_deps
