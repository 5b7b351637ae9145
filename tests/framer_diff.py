"""Run one conversation through a Python rewriter and through the engine's C framer.

::

    ops: [("req", chunk) | ("rep", chunk)] --ClusterRewriter.feed_*-----> bytes | error
                                           --_engine.Framer + rewrite_asked--> bytes | error

Both see the same calls in the same order; ``same_output`` says whether the client
would have received the same bytes (up to a protocol error, which both must hit on the
same chunk: the Python relay drops that chunk, the engine what it had not sent).
``compare`` does the same for any pair of runs (the Memcached fuzz brings its own), and
the rest is the harness both framer fuzzers share: chunked and corrupted streams for
Hypothesis, and the AddressSanitizer build of the framer with its corpus.
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import pytest
from hypothesis import strategies as st

from proxy.protocols.redis_cluster import ClusterRewriter, rewrite_asked
from proxy.relay.engine import _engine
from tests.support import FRAMER_SOURCES

ROOT = Path(__file__).resolve().parent.parent
UPSTREAM = ("10.0.0.1", 6379)
MAP: dict[tuple[str, int], tuple[str, int]] = {
    ("10.0.0.1", 6379): ("nat.example", 7001),
    ("10.0.0.2", 6379): ("nat.example", 7002),
    ("10.0.0.3", 6380): ("nat.example", 7003),
}
IDS = {"a" * 40: ("nat.example", 7001), "b" * 40: ("nat.example", 7002)}

Ops = list[tuple[str, bytes]]
Run = Callable[[Ops], tuple[list[bytes], int | None]]


class Rewriter(Protocol):
    """What the Python relay calls: ClusterRewriter, AutoDiscoveryRewriter."""

    def feed_request(self, data: bytes) -> bytes | bytearray: ...

    def feed_reply(self, data: bytes) -> bytes | bytearray: ...


def rewriter_run(rw: Rewriter, ops: Ops) -> tuple[list[bytes], int | None]:
    """Per reply chunk, what a Python rewriter forwards; the index of the failing op."""
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


def framer_run(fr: Any, answer: Callable[[tuple[Any, ...]], bytes],
               ops: Ops) -> tuple[list[bytes], int | None]:
    """The same through a C framer, each ask answered by ``answer`` (whose ValueError is a
    protocol error, as the framer's own error events are)."""
    out: list[bytes] = []
    for i, (kind, chunk) in enumerate(ops):
        if kind == "req":
            fr.feed_request(chunk)
            continue
        parts: list[bytes] = []
        for ev in fr.feed_reply(chunk):
            if ev[0] in ("fwd", "emit"):
                parts.append(ev[1])
            elif ev[0] == "ask":
                try:
                    parts.append(answer(ev))
                except ValueError:
                    return out, i
            else:
                return out, i
        out.append(b"".join(parts))
    return out, None


def cluster_rewriter() -> ClusterRewriter:
    return ClusterRewriter(lambda h, p: MAP.get((h, p)), UPSTREAM,
                           unmapped_redirect="tryagain", by_id=IDS.get)


def python_run(ops: Ops) -> tuple[list[bytes], int | None]:
    """The Redis Cluster rewriter's run."""
    return rewriter_run(cluster_rewriter(), ops)


def node_map() -> object:
    nm = _engine.NodeMap()
    nm.swap([(h.encode(), p, b"%s:%d" % (a.encode(), ap)) for (h, p), (a, ap) in MAP.items()])
    return nm


def c_run(ops: Ops) -> tuple[list[bytes], int | None]:
    """The RESP framer's run; asks answered by the Python rewriters."""
    rw = cluster_rewriter()

    def answer(ev: tuple[Any, ...]) -> bytes:
        new = rewrite_asked(ev[2], ev[1], ev[3], rw.remap, tryagain=True)
        return bytes(ev[2] if new is None else new)

    return framer_run(_engine.Framer(node_map()), answer, ops)


def compare(python: Run, c: Run, ops: Ops) -> tuple[bool, str]:
    """Whether both runs fail on the same op and forward the same bytes; if not, where."""
    py, py_err = python(ops)
    cc, c_err = c(ops)
    if py_err != c_err:
        return False, f"error at op {py_err} (python) vs {c_err} (C)"
    a, b = b"".join(py), b"".join(cc)
    if a != b:
        at = next((i for i in range(min(len(a), len(b))) if a[i] != b[i]), min(len(a), len(b)))
        return False, (f"output differs at byte {at}: {a[at - 20:at + 40]!r} vs "
                       f"{b[at - 20:at + 40]!r}")
    return True, ""


def same_output(ops: Ops) -> tuple[bool, str]:
    """``compare`` for the Redis Cluster rewriter and the RESP framer."""
    return compare(python_run, c_run, ops)


# -- Hypothesis streams ---------------------------------------------------------------

def corrupt(draw: st.DrawFn, stream: bytes) -> bytes:
    """The stream with one byte replaced by a random one."""
    i = draw(st.integers(0, len(stream) - 1))
    return stream[:i] + bytes([draw(st.integers(0, 255))]) + stream[i + 1:]


def interleave(draw: st.DrawFn, req_stream: bytes, rep_stream: bytes, max_chunk: int,
               opening: int = 0) -> Ops:
    """Both streams cut into chunks of 1..max_chunk bytes and interleaved at random; with
    ``opening``, the client may speak first (a first request chunk of 1..opening bytes)."""
    ops: Ops = []
    qi = ri = 0
    if opening and req_stream and draw(st.booleans()):
        qi = draw(st.integers(1, opening))
        ops.append(("req", req_stream[:qi]))
    while qi < len(req_stream) or ri < len(rep_stream):
        size = draw(st.integers(1, max_chunk))
        if qi < len(req_stream) and (ri >= len(rep_stream) or draw(st.booleans())):
            ops.append(("req", req_stream[qi:qi + size]))
            qi += size
        else:
            ops.append(("rep", rep_stream[ri:ri + size]))
            ri += size
    return ops


def conversation(draw: st.DrawFn, requests: Sequence[bytes], replies: Sequence[bytes], *,
                 max_requests: int, max_replies: int, max_chunk: int,
                 corrupt_requests: bool = False, opening: int = 0) -> Ops:
    """Frames picked from ``requests`` and ``replies`` (not matched to each other), a reply
    byte changed half the time and, with ``corrupt_requests``, a request byte one time in
    ten; then ``interleave``d."""
    req_stream = b"".join(draw(st.lists(st.sampled_from(requests), max_size=max_requests)))
    rep_stream = b"".join(draw(st.lists(st.sampled_from(replies), max_size=max_replies)))
    if draw(st.booleans()) and rep_stream:
        rep_stream = corrupt(draw, rep_stream)
    if corrupt_requests and draw(st.integers(0, 9)) == 0 and req_stream:
        req_stream = corrupt(draw, req_stream)
    return interleave(draw, req_stream, rep_stream, max_chunk, opening)


def noise(chunks: st.SearchStrategy[bytes] | None = None,
          max_size: int = 10) -> st.SearchStrategy[Ops]:
    """Chunks of noise (random bytes unless told), each sent by the client or the node."""
    chunks = st.binary(min_size=1, max_size=200) if chunks is None else chunks
    return st.lists(st.tuples(st.sampled_from(["req", "rep"]), chunks), max_size=max_size)


# -- AddressSanitizer -----------------------------------------------------------------

def asan_cases(rng: random.Random, requests: Sequence[bytes], replies: Sequence[bytes], *,
               sampled: float, opening: bool) -> list[Ops]:
    """300 conversations: known frames (some with a byte changed) cut in two, and random
    bytes; with ``opening``, each starts with a whole request."""
    cases: list[Ops] = []
    for _ in range(300):
        ops: Ops = [("req", rng.choice(requests))] if opening else []
        for _ in range(rng.randint(1, 12)):
            kind = rng.choice(["req", "rep"])
            if rng.random() < sampled:
                data = rng.choice(requests if kind == "req" else replies)
                if rng.random() < 0.3:
                    i = rng.randrange(len(data))
                    data = data[:i] + bytes([rng.randrange(256)]) + data[i + 1:]
                cut = rng.randint(1, len(data))
                ops += [(kind, data[:cut]), (kind, data[cut:])]
            else:
                ops.append((kind, rng.randbytes(rng.randint(1, 300))))
        cases.append([(k, d) for k, d in ops if d])
    return cases


def raw_run(ops: Ops, *, memcache: bool) -> bytes:
    """The extension's framer with asks passed through unchanged and ``!`` at an error,
    as tests/framer_asan.c prints it."""
    fr = _engine.Framer(memcache=memcache)
    out = b""
    for kind, chunk in ops:
        if kind == "req":
            fr.feed_request(chunk)
            continue
        for ev in fr.feed_reply(chunk):
            if ev[0] == "error":
                return out + b"!"
            out += ev[2] if ev[0] == "ask" else ev[1]
    return out


def _asan_binary(tmp: Path) -> Path:
    cc = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler")
    out = tmp / "framer_asan"
    src = [str(ROOT / "tests/framer_asan.c"),
           *(str(ROOT / "proxy/relay" / f) for f in FRAMER_SOURCES)]
    r = subprocess.run([cc, "-g", "-O1", "-fsanitize=address,undefined", "-fno-omit-frame-pointer",
                        "-Wall", "-Wextra", "-Werror", "-I", str(ROOT / "proxy/relay"), *src,
                        "-o", str(out), "-lpthread"], capture_output=True, text=True)
    if r.returncode != 0:
        if "asan" in r.stderr.lower() or "sanitize" in r.stderr.lower():
            pytest.skip(f"AddressSanitizer is not installed here: {r.stderr.strip()[-200:]}")
        pytest.fail(r.stderr)
    return out


def check_under_address_sanitizer(tmp: Path, cases: list[Ops], *, memcache: bool) -> None:
    """Build the framer alone with ASan and UBSan, run the cases through it: no error, and
    per case the bytes the extension's framer forwards."""
    binary = _asan_binary(tmp)
    corpus = tmp / "corpus"
    corpus.mkdir()
    files = []
    for n, ops in enumerate(cases):
        files.append(str(corpus / f"{n}.bin"))
        with open(files[-1], "wb") as f:
            for kind, data in ops:
                f.write(b"Q" if kind == "req" else b"R")
                f.write(len(data).to_bytes(4, "little") + data)
    env = {**os.environ, "ASAN_OPTIONS": "detect_leaks=1:abort_on_error=0:exitcode=99",
           "UBSAN_OPTIONS": "halt_on_error=1:exitcode=98"}
    r = subprocess.run([str(binary), *(["--mc"] if memcache else []), *files],
                       capture_output=True, env=env, timeout=60)
    assert r.returncode == 0, r.stderr.decode(errors="replace")[-3000:]
    lines = r.stdout.decode().splitlines()
    assert len(lines) == len(cases)
    for ops, line in zip(cases, lines, strict=True):
        assert bytes.fromhex(line.strip()) == raw_run(ops, memcache=memcache), ops
