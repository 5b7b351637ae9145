"""The package's shape: no import circles among proxy's modules, lazy imports included."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "proxy"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Every proxy module -> the proxy modules it imports anywhere (top, lazy, TYPE_CHECKING)."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")
                    anchor = anchor[: len(anchor) - node.level + 1]
                    base = ".".join([*anchor, base] if base else anchor)
                targets = [base, *(f"{base}.{alias.name}" for alias in node.names)]
            for target in targets:
                if target in modules and target != name:
                    graph[name].add(target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_circles_in_the_package() -> None:
    graph = import_graph()
    assert "proxy.relay.engine" in graph and "proxy.process" in graph
    # A package's __init__ importing its own modules is not a circle of concerns.
    pruned = {m: {t for t in ts if not (m.startswith(t + ".") and graph.get(t) is not None
                                        and t == m.rpartition(".")[0])}
              for m, ts in graph.items()}
    assert cycles(pruned) == []


# Lower layers never import higher ones. The longest matching prefix gives a module's
# layer; a new module that matches none fails the test below until it is placed here.
LAYERS: dict[str, int] = {
    "proxy": 0,  # __init__: the version
    "proxy.process": 0,
    "proxy.closes": 0,  # why connections end: the one vocabulary
    "proxy.logs": 0,  # formatters, the connection log's writer thread
    "proxy.config": 0,
    "proxy.protocols": 0,  # proxy_header too
    "proxy.health.state": 0,
    "proxy.health.wire": 0,
    "proxy.cluster.ports": 0,
    "proxy.cluster.replication": 0,
    "proxy.relay": 0,  # the package's __init__, pipes, buffered, hubs, splice_way
    "proxy.tls": 1,
    "proxy.resolver": 1,
    "proxy.preread": 1,  # peeks at what a connection starts with (PROXY header, ClientHello)
    "proxy.admission": 1,  # may a client enter, as which address (allow, limits, PROXY header)
    "proxy.port": 1,  # a listener's listening socket, the descriptor reserve
    "proxy.dial": 2,  # a listener's upstream connect (over the resolver)
    "proxy.handshake": 2,  # a listener's TLS in Python: SNI route, handshakes, engine reports
    "proxy.reload": 1,
    "proxy.metrics": 1,
    "proxy.fleet": 1,
    "proxy.iptables": 1,
    "proxy.aws": 2,  # its render reuses iptables' YAML helpers
    "proxy.health.checks": 1,
    "proxy.health.prober": 1,
    "proxy.relay.choose": 1,
    "proxy.relay.splice_hub": 1,
    "proxy.relay.splice": 2,
    "proxy.relay.engine": 3,
    "proxy.health": 3,  # __init__ and monitor
    "proxy.cluster.discovery": 2,
    "proxy.cluster.relay": 2,
    "proxy.cluster.topology": 2,  # pure: which listeners, which node maps
    "proxy.cluster.node_relays": 3,  # a node listener's relay factories (uses the engine)
    "proxy.listener": 4,
    "proxy.idle": 4,  # idle_timeout over a listener's relays
    "proxy.relaypick": 4,  # which relay takes a listener's connection, and building it
    "proxy.admin": 5,  # __init__ and server
    "proxy.admin.http": 1,
    "proxy.admin.auth": 1,
    "proxy.admin.client": 1,
    "proxy.admin.page": 2,
    "proxy.admin.status": 5,
    "proxy.cluster": 5,  # __init__ and manager
    "proxy.server": 6,
    "proxy.runtime": 7,
    "proxy.supervisor": 8,
    "proxy.cli": 9,
    "proxy.__main__": 10,
}


def layer(module: str) -> int:
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        found = LAYERS.get(".".join(parts[:n]))
        if found is not None and (n > 1 or module == "proxy"):
            return found
    raise AssertionError(f"{module} has no layer in tests/test_layout.py LAYERS: place it there")


def test_no_module_imports_a_higher_layer() -> None:
    graph = import_graph()
    upward = sorted(f"{m} ({layer(m)}) -> {t} ({layer(t)})"
                    for m, targets in graph.items() for t in targets
                    if layer(t) > layer(m) and not m.startswith(t + "."))
    assert upward == []
