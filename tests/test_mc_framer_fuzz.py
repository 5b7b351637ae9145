"""The engine's C Memcached framer against the Python auto-discovery rewriter it replaces.

::

    ops: [("req", chunk) | ("rep", chunk)] --AutoDiscoveryRewriter.feed_*------> bytes | error
                                           --_engine.Framer(memcache=True)
                                             + NativeMcFraming.answer ----------> bytes | error

Hypothesis builds reply streams -- get/gets/gat values (whose data holds ``CONFIG
cluster``, ``VALUE AmazonElastiCache:cluster`` and CRLFs), meta ``VA`` blocks, both
auto-discovery forms, errors, ``noreply`` silence -- cut into random chunks with random
corruption, and plain random bytes; both must forward the same bytes and fail on the same
chunk. An AddressSanitizer build of the framer runs a corpus of the same streams.
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.cluster.relay import NativeMcFraming
from proxy.protocols.memcache import AutoDiscoveryNode, AutoDiscoveryRewriter
from proxy.relay.engine import _engine, native_available
from tests.support import FRAMER_SOURCES

pytestmark = pytest.mark.skipif(not native_available(), reason="the engine is not built here")

ROOT = Path(__file__).resolve().parent.parent
Ops = list[tuple[str, bytes]]
PORTS = {"n1.cache": 7001, "n2.cache": 7002}


def mapper(node: AutoDiscoveryNode) -> AutoDiscoveryNode | None:
    port = PORTS.get(node.hostname)
    return None if port is None else AutoDiscoveryNode("nat.example", "192.0.2.1", port)


def python_run(ops: Ops) -> tuple[list[bytes], int | None]:
    """Per reply chunk, what the Python rewriter forwards; the index of the failing op."""
    rw = AutoDiscoveryRewriter(mapper)
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


def c_run(ops: Ops) -> tuple[list[bytes], int | None]:
    """The same through the C framer; asks answered as the engine's hub answers them."""
    fr = _engine.Framer(memcache=True)
    framing = NativeMcFraming(_engine.NodeMap(memcache=True), mapper,
                              on_unmapped=lambda node: None,
                              on_protocol_error=lambda who: None)
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
                    parts.append(framing.answer(ev[1], ev[2], b""))
                except ValueError:
                    return out, i
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


def value(key: bytes, data: bytes, *extra: bytes) -> bytes:
    return b" ".join([b"VALUE", key, b"0", b"%d" % len(data), *extra]) + b"\r\n" + data + b"\r\n"


BLOCK = b"7\nn1.cache|10.0.0.1|11211 n2.cache|10.0.0.2|11211 n9.cache||11211\n"
REQUESTS = [b"config get cluster\r\n", b"get k\r\n", b"gets a b\r\n", b"set k 0 0 5\r\nhello\r\n",
            b"set k 0 0 5 noreply\r\nhello\r\n", b"mg k v\r\n", b"ms k 2\r\nhi\r\n",
            b"get AmazonElastiCache:cluster\r\n", b"version\r\n", b"mn\r\n", b"\x80\x00\x00"]
REPLIES = [
    b"CONFIG cluster 0 %d\r\n%s\r\nEND\r\n" % (len(BLOCK), BLOCK),
    value(b"AmazonElastiCache:cluster", BLOCK) + b"END\r\n",
    b"CONFIG  cluster  0 %d \r\n%s\r\nEND\r\n" % (len(BLOCK), BLOCK),   # extra spaces
    b"CONFIG cluster 0 9\r\nnot a cfg\r\nEND\r\n",                       # malformed block
    value(b"k", b"CONFIG cluster 0 3\r\nabc\r\nEND\r\n") + b"END\r\n",  # stored lookalike
    value(b"k", b"VALUE AmazonElastiCache:cluster 0 1\r\n", b"42") + b"END\r\n",
    value(b"a", b"x" * 3000) + value(b"b", b"") + b"END\r\n",
    b"VA 2 f\r\nhi\r\n", b"VA 0\r\n\r\n", b"HD\r\n", b"EN\r\n", b"MN\r\n", b"STORED\r\n",
    b"END\r\n", b"ERROR\r\n", b"CLIENT_ERROR bad data chunk\r\n", b"SERVER_ERROR oom\r\n",
    b"VERSION 1.6.21\r\n", b"VALUE k 0 x\r\n", b"VA\r\n", b"CONFIGX\r\n", b"VALUES\r\n",
    b"VALUE k 0 99999999999999999999999\r\n", b"\n", b"\r\n", b"\x81\x00\x00\x00",
]


@st.composite
def conversations(draw: st.DrawFn) -> Ops:
    reqs = draw(st.lists(st.sampled_from(REQUESTS), max_size=8))
    reps = draw(st.lists(st.sampled_from(REPLIES), max_size=12))
    req_stream, rep_stream = b"".join(reqs), b"".join(reps)
    if draw(st.booleans()) and rep_stream:  # corrupt a byte
        i = draw(st.integers(0, len(rep_stream) - 1))
        rep_stream = rep_stream[:i] + bytes([draw(st.integers(0, 255))]) + rep_stream[i + 1:]
    ops: Ops = []
    qi = ri = 0
    if req_stream and draw(st.booleans()):  # the usual start: the client speaks first
        size = draw(st.integers(1, 64))
        ops.append(("req", req_stream[:size]))
        qi = size
    while qi < len(req_stream) or ri < len(rep_stream):
        size = draw(st.integers(1, 400))
        if qi < len(req_stream) and (ri >= len(rep_stream) or draw(st.booleans())):
            ops.append(("req", req_stream[qi:qi + size]))
            qi += size
        else:
            ops.append(("rep", rep_stream[ri:ri + size]))
            ri += size
    return ops


@settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
@given(conversations())
def test_c_and_python_forward_the_same_bytes(ops: Ops) -> None:
    ok, why = same_output(ops)
    assert ok, why


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.lists(st.tuples(st.sampled_from(["req", "rep"]), st.binary(min_size=1, max_size=200)),
                max_size=10))
def test_random_bytes_fail_or_pass_alike(ops: Ops) -> None:
    ok, why = same_output(ops)
    assert ok, why


def test_both_auto_discovery_forms_are_rewritten_and_lookalike_values_are_not() -> None:
    stored = value(b"k", b"CONFIG cluster 0 3\r\nabc\r\nEND\r\n") + b"END\r\n"
    reply = b"CONFIG cluster 0 %d\r\n%s\r\nEND\r\n" % (len(BLOCK), BLOCK)
    ops: Ops = [("req", b"get k\r\nconfig get cluster\r\n"), ("rep", stored + reply[:30]),
                ("rep", reply[30:])]
    out, err = c_run(ops)
    assert err is None
    text = b"".join(out)
    assert text.startswith(stored)
    assert b"nat.example|192.0.2.1|7001 nat.example|192.0.2.1|7002 n9.cache||11211" in text
    assert same_output(ops)[0]


def test_an_overlong_line_and_a_bad_length_are_clean_errors() -> None:
    ops: Ops = [("req", b"get k\r\n"), ("rep", b"X" * 700_000), ("rep", b"Y" * 700_000)]
    assert c_run(ops)[1] == 2 and same_output(ops)[0]
    assert c_run([("req", b"get k\r\n"), ("rep", b"VALUE k 0 -1\r\n")])[1] == 1


def test_a_binary_connection_passes_untouched() -> None:
    reply = b"CONFIG cluster 0 %d\r\n%s\r\nEND\r\n" % (len(BLOCK), BLOCK)
    for ops in ([("req", b"\x80\x01"), ("rep", reply)], [("rep", b"\x81" + reply)]):
        assert c_run(ops) == (python_run(ops)[0], None)
        assert b"".join(c_run(ops)[0]).endswith(reply)


# -- AddressSanitizer --------------------------------------------------------------

HARNESS = ROOT / "tests" / "framer_asan.c"


def test_mc_framer_under_address_sanitizer(tmp_path: Path) -> None:
    """Random and structured streams through an ASan/UBSan build of the framer in
    Memcached mode: no error, and the same output as the framer in the extension."""
    cc = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler")
    binary = tmp_path / "framer_asan"
    src = [str(HARNESS), *(str(ROOT / "proxy/relay" / f) for f in FRAMER_SOURCES)]
    r = subprocess.run([cc, "-g", "-O1", "-fsanitize=address,undefined", "-fno-omit-frame-pointer",
                        "-Wall", "-Wextra", "-Werror", "-I", str(ROOT / "proxy/relay"), *src,
                        "-o", str(binary), "-lpthread"], capture_output=True, text=True)
    if r.returncode != 0:
        if "asan" in r.stderr.lower() or "sanitize" in r.stderr.lower():
            pytest.skip(f"AddressSanitizer is not installed here: {r.stderr.strip()[-200:]}")
        pytest.fail(r.stderr)
    rng = random.Random(25)
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    cases: list[Ops] = []
    for n in range(300):
        ops: Ops = [("req", rng.choice(REQUESTS))]
        for _ in range(rng.randint(1, 12)):
            kind = rng.choice(["req", "rep"])
            if rng.random() < 0.6:
                data = rng.choice(REQUESTS if kind == "req" else REPLIES)
                if rng.random() < 0.3:
                    i = rng.randrange(len(data))
                    data = data[:i] + bytes([rng.randrange(256)]) + data[i + 1:]
                cut = rng.randint(1, len(data))
                ops += [(kind, data[:cut]), (kind, data[cut:])]
            else:
                ops.append((kind, rng.randbytes(rng.randint(1, 300))))
        ops = [(k, d) for k, d in ops if d]
        cases.append(ops)
        with open(corpus / f"{n}.bin", "wb") as f:
            for kind, data in ops:
                f.write(b"Q" if kind == "req" else b"R")
                f.write(len(data).to_bytes(4, "little") + data)
    env = {**os.environ, "ASAN_OPTIONS": "detect_leaks=1:abort_on_error=0:exitcode=99",
           "UBSAN_OPTIONS": "halt_on_error=1:exitcode=98"}
    r2 = subprocess.run([str(binary), "--mc", *sorted(map(str, corpus.iterdir()),
                                                      key=lambda p: int(Path(p).stem))],
                        capture_output=True, env=env, timeout=60)
    assert r2.returncode == 0, r2.stderr.decode(errors="replace")[-3000:]
    lines = r2.stdout.decode().splitlines()
    assert len(lines) == len(cases)
    for ops, line in zip(cases, lines, strict=True):
        assert bytes.fromhex(line.strip()) == c_run_raw(ops), ops


def c_run_raw(ops: Ops) -> bytes:
    """The extension's framer with asks passed through unchanged and ``!`` at an error,
    as the harness prints it."""
    fr = _engine.Framer(memcache=True)
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
