"""Read a port map: YAML, then the model, then what spans fields and listeners.

    file --yamlmap--> YamlMap (values with their lines)
         --model----> one section at a time (DefaultsSection, ListenerSection...)
         --resolve--> Config (defaults filled in, health merged, no clashes)

Sections are validated and resolved in the order the file is explained in (top-level
keys, defaults, admin, each listener, the process settings, each cluster), so of
several mistakes the first reported is the one the hand-written validator this
replaces reported. Every step raises one ``ConfigError`` naming file, line, listener
and field; nothing binds a socket, so a reload builds and compares a new ``Config``
without disturbing the running one.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from pydantic import ValidationError

from . import errors
from .model import (
    PASSWORD_KEYS,
    AdminSection,
    AwsSection,
    ClusterSection,
    DefaultsSection,
    HealthSection,
    ListenerSection,
    PortMap,
    Section,
    TlsSection,
    Tunables,
    UpstreamTlsSection,
)
from .parsers import (
    BASE_DIR,
    conflicts,
    is_loopback,
    parse_address,
    parse_backup,
    parse_upstream,
    password_from_env,
    password_from_file,
)
from .resolved import (
    AdminConfig,
    AwsConfig,
    ClusterConfig,
    Config,
    HealthConfig,
    ListenerConfig,
    TlsConfig,
    UpstreamTlsConfig,
)
from .sni import SniRoute
from .values import (
    DEFAULT_CHECK_TIMEOUT,
    DEFAULT_DRAIN_DELAY,
    DEFAULT_PORTS,
    DEFAULT_REPLICATION_REFRESH,
    ENGINE_PROTOCOL,
    Address,
    ConfigError,
    Protocol,
    show,
)
from .yamlmap import YamlMap, load_yaml

# Listener settings in the order they are inherited from ``defaults`` (health apart:
# it merges key by key instead of replacing).
TUNABLE_KEYS = (*(k for k in Tunables.yaml_keys() if k != "health"), "protocol")
CLUSTER_TUNABLE_KEYS = tuple(k for k in TUNABLE_KEYS if k != "protocol")
_REDIS_ONLY = ("username", "role", *PASSWORD_KEYS)


class _Context:
    """The file being read, for located errors."""

    def __init__(self, path: str) -> None:
        self.path = path

    def error(self, message: str, *, line: int | None = None, where: str = "") -> ConfigError:
        return errors.located(self.path, message, line, where)

    def field(self, raw: YamlMap, key: str, where: str, parse: Any, *args: Any) -> Any:
        """``parse(raw[key], *args)`` with a ``ValueError`` located at the key."""
        try:
            return parse(raw[key], *args)
        except ValueError as exc:
            raise self.error(f"field {show(key)}: {exc}", line=raw.lines.get(key, raw.line),
                             where=where) from None


class _HealthSpec:
    """One ``health:`` block, validated but not yet merged: only the keys it gave."""

    def __init__(self, values: dict[str, Any], block: YamlMap | None) -> None:
        self.values = values
        self.block = block  # for error lines; None for ``health: on``


def _health_spec(ctx: _Context, section: HealthSection | None, raw: Any,
                 where: str) -> _HealthSpec | None:
    """``health: off | on | {...}`` as the keys given; ``None`` means off."""
    if section is None:
        return None
    block = raw if isinstance(raw, YamlMap) else None
    hwhere = f"{where}health: "
    values: dict[str, Any] = {}
    for key in HealthSection.yaml_keys():
        if key not in section.given():
            continue
        value = getattr(section, key)
        if key == "password_env" and block is not None:
            value = ctx.field(block, key, hwhere, lambda _, name: password_from_env(name), value)
        elif key == "password_file" and block is not None:
            value = ctx.field(block, key, hwhere, lambda _, name: password_from_file(name), value)
        values["password" if key in PASSWORD_KEYS else key] = value
    return _HealthSpec(values, block)


def _merge_health(
    ctx: _Context, default: _HealthSpec | None, own: _HealthSpec | None, own_given: bool,
    protocol: Protocol, where: str, line: int,
) -> HealthConfig | None:
    """The listener's own block overrides ``defaults`` key by key; ``off`` turns it off."""
    if (own_given and own is None) or (not own_given and default is None):
        return None
    values = {**(default.values if default else {}), **(own.values if own else {})}
    kind: Protocol = values.setdefault("kind", protocol)
    block = own.block if own is not None else None
    hwhere = f"{where}health: "
    # Only the listener's own block is held to these: defaults may carry redis
    # credentials that simply do not apply to the memcached listeners.
    misplaced = {key: "redis" for key in _REDIS_ONLY} | {"stats": "memcached"}
    for key, wants in misplaced.items():
        if kind != wants and block is not None and key in block:
            raise ctx.error(f"field {key!r} applies only to {wants} checks, and this check "
                            f"is {kind}", line=block.lines[key], where=hwhere)
        if kind != wants:
            values.pop(key, None)
    if "timeout" not in values and "interval" in values:
        # A short interval without a timeout: the check must still end before the next.
        values["timeout"] = min(DEFAULT_CHECK_TIMEOUT, values["interval"])
    health = HealthConfig(**values)
    if health.timeout > health.interval:
        at = line
        if block is not None:
            at = block.lines.get("timeout", block.lines.get("interval", block.line))
        raise ctx.error(f"timeout {health.timeout:g}s is longer than interval "
                        f"{health.interval:g}s; a check must end before the next one starts",
                        line=at, where=hwhere)
    return health


def _setting(key: str, own: Tunables, defaults: Tunables) -> Any:
    """A listener's own value, else the defaults' value, else the model's default."""
    value = own.get(key) if key in own.given() else defaults.get(key)
    if isinstance(value, TlsSection):
        return TlsConfig(cert=value.cert, key=value.key, client_ca=value.client_ca)
    if isinstance(value, UpstreamTlsSection):
        return UpstreamTlsConfig(server_name=value.server_name, ca=value.ca, verify=value.verify)
    return value


def _check_proxy_protocol(ctx: _Context, settings: dict[str, Any], raw: YamlMap,
                          given: set[str], where: str) -> None:
    """A header is trusted only from the load balancers, so naming them is not optional."""
    if settings["proxy_protocol"] != "off" and settings["proxy_protocol_from"] is None:
        origin = "" if "proxy_protocol" in given else " (set in defaults)"
        raise ctx.error(
            f"field 'proxy_protocol': {settings['proxy_protocol']}{origin} needs "
            "proxy_protocol_from: [CIDR, ...], the load balancers allowed to send a header "
            "(anyone else could claim any client address)",
            line=raw.lines.get("proxy_protocol", raw.line), where=where)


S = TypeVar("S", bound=Section)


class _Resolver:
    """Validates a document section by section, in the order the file is explained in,
    and builds ``Config`` from the sections and the YAML they came from (for lines)."""

    def __init__(self, ctx: _Context, data: YamlMap) -> None:
        self.ctx = ctx
        self.data = data
        raw_defaults = data.get("defaults", YamlMap())
        if not isinstance(raw_defaults, YamlMap):
            raise ctx.error(f"expected a mapping, got {show(raw_defaults)}",
                            line=data.lines["defaults"], where="defaults: ")
        self.defaults = self.validate(DefaultsSection, raw_defaults, ("defaults",))
        # Health checks are on unless a defaults or listener block says ``health: off``.
        self.default_health: _HealthSpec | None = _HealthSpec({}, None)
        if "health" in self.defaults.given():
            self.default_health = _health_spec(ctx, self.defaults.health, raw_defaults["health"],
                                               "defaults: ")

    def validate(self, model: type[S], value: Any, prefix: tuple[str | int, ...]) -> S:
        """``value`` (found at ``prefix`` in the file) as ``model``, or the located error."""
        try:
            return model.model_validate(value)
        except ValidationError as exc:
            raise errors.render(exc, self.data, self.ctx.path, prefix) from None

    def top(self, key: str) -> Any:
        """A top-level setting, validated alone: its value or the model's default."""
        if key not in self.data:
            return PortMap.model_fields[PortMap.yaml_keys()[key]].get_default(
                call_default_factory=True)
        return self.validate(PortMap, {key: self.data[key]}, ()).get(key)

    def admin(self) -> AdminConfig | None:
        if "admin" not in self.data:
            return AdminConfig()
        section: AdminSection | None = self.top("admin")
        if section is None:
            return None
        given = {key: section.get(key) for key in section.given()}
        if "token_file" in given:
            raw = self.data["admin"]
            assert isinstance(raw, YamlMap)
            given["token"] = self.ctx.field(raw, "token_file", "admin: ",
                                            lambda _, name: password_from_file(name),
                                            given.pop("token_file"))
        return AdminConfig(explicit=True, **given)

    def listener(self, section: ListenerSection, raw: YamlMap) -> ListenerConfig:
        ctx, given = self.ctx, section.given()
        where = f"listener {show(section.name)}: "
        settings = {key: _setting(key, section, self.defaults) for key in TUNABLE_KEYS}
        protocol: Protocol = settings["protocol"]
        default_port = DEFAULT_PORTS.get(protocol)
        routes = self.sni_routes(section, raw, settings, default_port, where)
        if routes:
            upstream = routes[0].upstream
        elif "upstream" not in given:
            raise ctx.error("missing required field 'upstream' (or sni_routes)", line=raw.line,
                            where=where)
        else:
            upstream = ctx.field(raw, "upstream", where, parse_upstream, default_port)
        backup = (ctx.field(raw, "backup", where, parse_backup, upstream, default_port)
                  if "backup" in given else ())
        own = _health_spec(ctx, section.health, raw.get("health"), where) \
            if "health" in given else None
        health = _merge_health(ctx, self.default_health, own, "health" in given, protocol,
                               where, raw.line) if not routes else None
        if health is None:
            # Without checks nothing ever says the upstream is DOWN, so these would never act.
            for key in ("backup", "on_down"):
                if key in given and (key == "backup" or settings["on_down"] == "close"):
                    raise ctx.error(f"field {key!r} needs health checks to act, and they are "
                                    f"off for this listener", line=raw.lines[key], where=where)
        listen = section.listen
        if settings["allow"] is None and not is_loopback(listen):
            raise ctx.error(
                f"field 'listen': {listen} is reachable from other hosts but no 'allow' list "
                "says who may connect; add allow: [CIDR, ...] to the listener or to defaults "
                "(allow: [0.0.0.0/0] opens it to everyone)",
                line=raw.lines.get("listen", raw.line), where=where)
        _check_proxy_protocol(ctx, settings, raw, given, where)
        lc = ListenerConfig(name=section.name, listen=listen, upstream=upstream, backup=backup,
                            health=health, sni_routes=routes, **settings)
        if lc.copy == "splice" and not lc.may_splice:
            origin = "" if "copy" in given else " (set in defaults)"
            raise ctx.error(
                f"field 'copy': {lc.copy}{origin} needs a plain byte stream -- no tls or "
                "upstream_tls -- and TLS is encrypted and decrypted in userspace; use copy: "
                "auto or buffer for this listener", line=raw.lines.get("copy", raw.line),
                where=where)
        return lc

    def sni_routes(self, section: ListenerSection, raw: YamlMap, settings: dict[str, Any],
                   default_port: int | None, where: str) -> tuple[SniRoute, ...]:
        """The listener's routes by server name; what cannot go with them is an error."""
        if section.sni_routes is None:
            return ()
        ctx, given = self.ctx, section.given()
        line = raw.lines.get("sni_routes", raw.line)
        if not section.sni_routes:
            raise ctx.error("field 'sni_routes': expected at least one route (server_name, "
                            "upstream)", line=line, where=where)
        for key, why in (("upstream", "each route names its upstream"),
                         ("backup", "a route's upstream has no backups"),
                         ("health", "routes have no fixed upstream to check"),
                         ("tls", "TLS passes through to the node, which terminates it"),
                         ("upstream_tls", "TLS passes through untouched")):
            if key in given:
                if key == "health" and section.health is None:
                    continue  # health: off says what sni_routes implies
                origin = ""
            elif key in ("tls", "upstream_tls") and settings[key] is not None:
                origin = " (set in defaults)"
            else:
                continue
            raise ctx.error(f"field {key!r}{origin} cannot go with sni_routes: {why}",
                            line=raw.lines.get(key, line), where=where)
        routes: list[SniRoute] = []
        seen: set[str] = set()
        raw_routes = raw.get("sni_routes")
        for index, entry in enumerate(section.sni_routes):
            at = f"{where}sni_routes[{index}]: "
            line = getattr(raw_routes[index], "line", line) if isinstance(raw_routes, list) \
                else line
            port = entry.upstream.port or default_port
            if port is None:
                raise ctx.error("field 'upstream': missing port (protocol tcp has no default "
                                "port)", line=line, where=at)
            if entry.server_name in seen:
                raise ctx.error(f"field 'server_name': {entry.server_name} is routed twice",
                                line=line, where=at)
            seen.add(entry.server_name)
            routes.append(SniRoute(entry.server_name, Address(entry.upstream.host, port)))
        return tuple(routes)

    def listeners(self, admin: AdminConfig | None) -> list[ListenerConfig]:
        ctx = self.ctx
        listeners: list[ListenerConfig] = []
        by_name: dict[str, int] = {}
        by_port: dict[int, list[int]] = {}  # only same-port listeners can clash
        raw_listeners = self.data.get("listeners")
        if raw_listeners is None:
            return []
        if not isinstance(raw_listeners, list):
            raise ctx.error(f"'listeners' must be a list, got {show(raw_listeners)}",
                            line=self.data.lines["listeners"])
        for index, raw in enumerate(raw_listeners):
            lc = self.listener(self.validate(ListenerSection, raw, ("listeners", index)), raw)
            line = raw.line
            named = by_name.get(lc.name)
            clash = next((i for i in by_port.get(lc.listen.port, ())
                          if conflicts(listeners[i].listen, lc.listen)), None)
            if named is not None and (clash is None or named <= clash):
                raise ctx.error(f"duplicate name {lc.name!r}, already used by listeners"
                                f"[{named}]", line=line,
                                where=f"listener {lc.name!r}: field 'name': ")
            if clash is not None:
                other = listeners[clash]
                raise ctx.error(
                    f"address {lc.listen} is already used by listener {other.name!r}"
                    f" ({other.listen})", line=raw.lines.get("listen", line),
                    where=f"listener {lc.name!r}: field 'listen': ")
            if admin is not None and conflicts(admin.listen, lc.listen):
                raise ctx.error(
                    f"address {lc.listen} is already used by the admin endpoint "
                    f"({admin.listen})", line=raw.lines.get("listen", line),
                    where=f"listener {lc.name!r}: field 'listen': ")
            by_name[lc.name] = len(listeners)
            if lc.listen.port != 0:  # port 0 never clashes: indexing it made N listeners N²
                by_port.setdefault(lc.listen.port, []).append(len(listeners))
            listeners.append(lc)
        return listeners

    def cluster(self, section: ClusterSection, raw: YamlMap) -> ClusterConfig:
        ctx, given, name = self.ctx, section.given(), section.name
        where = f"cluster {show(name)}: "
        protocol = ENGINE_PROTOCOL[section.engine]
        seed = ctx.field(raw, "seed", where, lambda value: parse_address(
            value, default_host=None, default_port=DEFAULT_PORTS[protocol]))
        announce = section.announce
        if "announce_ip" in given:
            announce_ip = section.announce_ip
        else:
            announce_ip = announce if Address(announce, 0).is_ip else ""
        ports, seed_port = section.ports, section.seed_port
        if seed_port is not None and ports[0] <= seed_port <= ports[1]:
            raise ctx.error(f"field 'seed_port': {seed_port} is inside the node range "
                            f"{ports[0]}-{ports[1]}; pick a port outside it",
                            line=raw.lines["seed_port"], where=where)
        named: dict[int, str] = {seed_port: "seed_port"} if seed_port is not None else {}
        for key in ("primary_port", "reader_port"):
            port = section.get(key)
            if port is None:
                continue
            if section.engine != "redis-replication":
                raise ctx.error(f"field {key!r}: only engine redis-replication has a primary "
                                "and replicas; remove it", line=raw.lines[key], where=where)
            if ports[0] <= port <= ports[1]:
                raise ctx.error(f"field {key!r}: {port} is inside the node range "
                                f"{ports[0]}-{ports[1]}; pick a port outside it",
                                line=raw.lines[key], where=where)
            if port in named:
                raise ctx.error(f"field {key!r}: {port} is also this cluster's "
                                f"{named[port]}", line=raw.lines[key], where=where)
            named[port] = key
        host = section.listen
        settings = {key: _setting(key, section, self.defaults) for key in CLUSTER_TUNABLE_KEYS}
        listen = Address(host, ports[0])
        if settings["allow"] is None and not is_loopback(listen):
            raise ctx.error(
                f"its listeners bind {host}, reachable from other hosts, but no 'allow' list "
                "says who may connect; add allow: [CIDR, ...] to the cluster or to defaults",
                line=raw.lines.get("listen", raw.line), where=where)
        _check_proxy_protocol(ctx, settings, raw, given, where)
        # The cluster's health block gives discovery its credentials (Redis ACL / RBAC).
        own = _health_spec(ctx, section.health, raw.get("health"), where) \
            if "health" in given else None
        health = _merge_health(ctx, self.default_health, own, "health" in given, protocol,
                               where, raw.line)
        template = ListenerConfig(name=name, listen=listen, upstream=seed, protocol=protocol,
                                  health=health, **settings)
        return ClusterConfig(name=name, engine=section.engine, seed=seed, announce=announce,
                             announce_ip=announce_ip, ports=ports, template=template,
                             seed_port=seed_port,
                             refresh=section.refresh if "refresh" in given
                             or section.engine != "redis-replication"
                             else DEFAULT_REPLICATION_REFRESH,
                             retire_grace=section.retire_grace,
                             primary_port=section.primary_port,
                             reader_port=section.reader_port,
                             close_on_failover=section.close_on_failover)

    def clusters(self, listeners: list[ListenerConfig]) -> tuple[ClusterConfig, ...]:
        ctx = self.ctx
        clusters: list[ClusterConfig] = []
        raw_clusters = self.data.get("clusters")
        if raw_clusters is None:
            return ()
        if not isinstance(raw_clusters, list):
            raise ctx.error(f"'clusters' must be a list, got {show(raw_clusters)}",
                            line=self.data.lines["clusters"])
        for index, raw in enumerate(raw_clusters):
            cc = self.cluster(self.validate(ClusterSection, raw, ("clusters", index)), raw)
            at = raw.line
            where = f"cluster {cc.name!r}: "
            for other in clusters:
                if other.name == cc.name:
                    raise ctx.error(f"duplicate name {cc.name!r}, already used by clusters"
                                    f"[{clusters.index(other)}]", line=at,
                                    where=where + "field 'name': ")
            for lc in listeners:
                if lc.name == cc.name:
                    raise ctx.error(f"name {cc.name!r} is already used by a listener", line=at,
                                    where=where + "field 'name': ")
            mine = {a.port for a in cc.addresses()}
            host = cc.listen_host
            for lc in listeners:
                if lc.listen.port in mine and conflicts(lc.listen, Address(host, lc.listen.port)):
                    raise ctx.error(
                        f"listener {lc.name!r} ({lc.listen}) uses a port of this cluster's "
                        f"range {cc.ports[0]}-{cc.ports[1]} or its seed/primary/reader port",
                        line=at,
                        where=where)
            for other in clusters:
                common = mine & {a.port for a in other.addresses()}
                if common and conflicts(Address(host, 1), Address(other.listen_host, 1)):
                    raise ctx.error(f"port {min(common)} is also in cluster {other.name!r}'s "
                                    "range or seed/primary/reader port", line=at, where=where)
            clusters.append(cc)
        return tuple(clusters)


def parse_config(data: Any, path: str = "<config>") -> Config:
    """Validate a loaded YAML document (as from ``load_yaml``) into a ``Config``."""
    base = Path(path).parent if not path.startswith("<") else Path(".")
    token = BASE_DIR.set(base)
    try:
        return _parse_config(data, path)
    finally:
        BASE_DIR.reset(token)


def _parse_config(data: Any, path: str) -> Config:
    ctx = _Context(path)
    if data is None:
        raise ctx.error("the file is empty; expected a mapping with a 'listeners' list")
    if not isinstance(data, YamlMap):
        raise ctx.error(f"expected a mapping with a 'listeners' list at the top, got {show(data)}")
    known = list(PortMap.yaml_keys())
    for key in data:
        if key not in known:
            raise ctx.error(errors.unknown_key(key, known), line=data.lines.get(key, data.line))
    resolver = _Resolver(ctx, data)
    admin = resolver.admin()
    aws_section = resolver.top("aws")
    aws = AwsConfig(**{key: aws_section.get(key) for key in AwsSection.yaml_keys()}) \
        if aws_section is not None else None
    if data.get("listeners") in (None, []) and not data.get("clusters") and aws is None:
        raise ctx.error("the port map has no listeners; add at least one under 'listeners' "
                        "(or a cluster under 'clusters')", line=data.lines.get("listeners"))
    listeners = resolver.listeners(admin)
    top = {key: resolver.top(key) for key in ("drain_timeout", "drain_delay", "workers",
                                              "engine_threads", "busy_poll", "state_dir",
                                              "logging")}
    if "drain_delay" not in data:
        # Only a load balancer that can reach /readyz benefits from the delay; with the
        # admin endpoint on loopback (or off) nothing outside can see it, so stop at once.
        reachable = admin is not None and not is_loopback(admin.listen)
        top["drain_delay"] = DEFAULT_DRAIN_DELAY if reachable else 0.0
    return Config(path=path, listeners=tuple(listeners), admin=admin,
                  clusters=resolver.clusters(listeners), drain_timeout=top["drain_timeout"],
                  drain_delay=top["drain_delay"],
                  workers=top["workers"], engine_threads=top["engine_threads"],
                  busy_poll_us=top["busy_poll"], state_dir=top["state_dir"], aws=aws,
                  log_format=top["logging"].log_format)


def load_config(path: str | Path, extend: Callable[[str], str] | None = None) -> Config:
    """Read and validate a port map file; ``extend`` may add to its text first (the
    ``aws:`` source adds the clusters it read)."""
    name = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{name}: no such file") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{name}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise ConfigError(f"{name}: cannot read: {exc.strerror}") from None
    return parse_config(load_yaml(extend(text) if extend else text, name), name)
