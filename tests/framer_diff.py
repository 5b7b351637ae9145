"""Run one conversation through the Python rewriter and through the engine's C framer.

::

    ops: [("req", chunk) | ("rep", chunk)] --ClusterRewriter.feed_*-----> bytes | error
                                           --_engine.Framer + rewrite_asked--> bytes | error

Both see the same calls in the same order; ``same_output`` says whether the client
would have received the same bytes (up to a protocol error, which both must hit on the
same chunk: the Python relay drops that chunk, the engine what it had not sent).
"""

from __future__ import annotations

from proxy.protocols.redis_cluster import ClusterRewriter, rewrite_asked
from proxy.relay.engine import _engine

UPSTREAM = ("10.0.0.1", 6379)
MAP: dict[tuple[str, int], tuple[str, int]] = {
    ("10.0.0.1", 6379): ("nat.example", 7001),
    ("10.0.0.2", 6379): ("nat.example", 7002),
    ("10.0.0.3", 6380): ("nat.example", 7003),
}
IDS = {"a" * 40: ("nat.example", 7001), "b" * 40: ("nat.example", 7002)}

Ops = list[tuple[str, bytes]]


def python_run(ops: Ops) -> tuple[list[bytes], int | None]:
    """Per reply chunk, what the Python rewriter forwards; the index of the failing op."""
    rw = ClusterRewriter(lambda h, p: MAP.get((h, p)), UPSTREAM,
                         unmapped_redirect="tryagain", by_id=IDS.get)
    out: list[bytes] = []
    for i, (kind, chunk) in enumerate(ops):
        if kind == "req":
            rw.feed_request(chunk)
            continue
        try:
            out.append(bytes(rw.feed_reply(chunk)))
        except ValueError:
            return out, i
    return out, None


def node_map() -> object:
    nm = _engine.NodeMap()
    nm.swap([(h.encode(), p, b"%s:%d" % (a.encode(), ap)) for (h, p), (a, ap) in MAP.items()])
    return nm


def c_run(ops: Ops) -> tuple[list[bytes], int | None]:
    """The same through the C framer; asks answered by the Python rewriters."""
    fr = _engine.Framer(node_map())
    rw = ClusterRewriter(lambda h, p: MAP.get((h, p)), UPSTREAM,
                         unmapped_redirect="tryagain", by_id=IDS.get)
    out: list[bytes] = []
    for i, (kind, chunk) in enumerate(ops):
        if kind == "req":
            fr.feed_request(chunk)
            continue
        parts: list[bytes] = []
        for ev in fr.feed_reply(chunk):
            if ev[0] == "fwd":
                parts.append(ev[1])
            elif ev[0] == "emit":
                parts.append(ev[1])
            elif ev[0] == "ask":
                new = rewrite_asked(ev[2], ev[1], ev[3], rw.remap, tryagain=True)
                parts.append(ev[2] if new is None else new)
            else:
                return out, i
        out.append(b"".join(parts))
    return out, None


def same_output(ops: Ops) -> tuple[bool, str]:
    py, py_err = python_run(ops)
    c, c_err = c_run(ops)
    if py_err != c_err:
        return False, f"error at op {py_err} (python) vs {c_err} (C)"
    a, b = b"".join(py), b"".join(c)
    if a != b:
        at = next((i for i in range(min(len(a), len(b))) if a[i] != b[i]), min(len(a), len(b)))
        return False, (f"output differs at byte {at}: {a[at - 20:at + 40]!r} vs "
                       f"{b[at - 20:at + 40]!r}")
    return True, ""
