"""Bytes from an operator, fuzzed: the YAML port map (as raw file bytes) and
``import-iptables`` input. The only failures allowed are the config error with its file
name, or ``import-iptables`` exit code 2 with a one-line reason: no traceback, no other
exception, and whatever the import writes must load as a port map.

tests/test_config_fuzz.py fuzzes the map as text and as YAML documents; here the input
is bytes (any encoding, control characters, byte-level edits of a valid map). The
example count comes from the Hypothesis profile (tests/conftest.py).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import subprocess
import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.config import ConfigError, load_config, load_yaml, parse_config
from proxy.iptables.command import cmd_import
from proxy.iptables.parse import parse_rules
from proxy.iptables.render import render_yaml
from tests.support import ROOT, cacheport_cmd, cacheport_env
from tests.test_fuzz_wire import mutated, run_under_atheris

MAP = b"""\
defaults:
  connect_timeout: 1s
  allow: [198.51.100.0/24, "2001:db8::/32"]
drain_timeout: 5s
admin: {listen: '127.0.0.1:0'}
listeners:
  - name: mc
    listen: 0.0.0.0:11211
    upstream: 10.0.1.230:11211
    protocol: memcached
    idle_timeout: 10m
  - {name: rd, listen: '[::1]:6380', upstream: node.example.internal, protocol: redis,
     max_connections: 10, proxy_protocol: v2, proxy_protocol_from: [192.0.2.0/24]}
  - name: tls
    listen: 127.0.0.1:6390
    upstream: ${REDIS_NODE:-10.0.1.9:6379}
    upstream_tls: {server_name: node.example.internal}
"""
MAP_PIECES = [line + b"\n" for line in MAP.splitlines()] + [
    b"- ", b": ", b"&a ", b"*a", b"<<: *a\n", b"!!python/object:os.system\n", b"\t", b"---\n",
    b"\xef\xbb\xbf", b"\xff\xfe", b"${", b"$$", b"'", b'"', b"{", b"[", b"\x00", b"%YAML 1.2\n",
]

RULES = b"""\
*nat
:PREROUTING ACCEPT [0:0]
-A PREROUTING -i eth0 -p tcp -m tcp --dport 11211 -j DNAT --to-destination 10.0.1.230:11211
-A PREROUTING -s 198.51.100.0/24 -d 192.0.2.1/32 -p tcp --dport 6380 -j DNAT --to 10.0.1.231
-A PREROUTING -p tcp --dport 7000:7010 -j DNAT --to-destination [2001:db8::1]:7000
-A POSTROUTING -o eth0 -j MASQUERADE
COMMIT
sudo iptables -t nat -A PREROUTING -i eth0 -p tcp --dport 6381 -j DNAT --to 10.0.1.232:6379
sudo iptables -t nat -I PREROUTING 1 -p tcp --dport 11212 -m comment --comment "a b" \\
    -j DNAT --to-dest=10.0.1.231:11211
echo 1 > /proc/sys/net/ipv4/ip_forward
"""
RULE_PIECES = [line + b"\n" for line in RULES.splitlines()] + [
    b"-A PREROUTING ", b"-p tcp ", b"--dport ", b"-j DNAT ", b"--to ", b"65536 ", b"0 ",
    b"-t nat ", b"! ", b"-s 0.0.0.0/0 ", b"\\\n", b"# c\n", b"'", b'"', b"[::]:1 ",
    b"10.0.0.1:99999 ", b"--to-destination 10.0.0.1-10.0.0.9 ",
]


def _load_bytes(data: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "fuzz.yaml"
        path.write_bytes(data)
        try:
            load_config(path)
        except ConfigError as exc:
            assert str(exc).startswith(str(path)), exc


@settings(deadline=None)
@given(st.one_of(st.binary(max_size=400), mutated(MAP_PIECES, pieces=12)))
def test_port_map_bytes_load_or_raise_the_config_error(data: bytes) -> None:
    _load_bytes(data)


def _import(data: bytes) -> tuple[int, str]:
    """``import-iptables`` in this process: (exit code, stderr); its output must load."""
    with tempfile.TemporaryDirectory() as tmp:
        rules, out = Path(tmp) / "rules", Path(tmp) / "out.yaml"
        rules.write_bytes(data)
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            code = cmd_import(argparse.Namespace(file=str(rules), output=str(out)))
        assert code in (0, 2), code
        assert "not valid" not in err.getvalue(), err.getvalue()  # a bad translation
        if code == 0:
            parse_config(load_yaml(out.read_text(), "out.yaml"), "out.yaml")
        return code, err.getvalue()


@settings(deadline=None)
@given(st.one_of(st.binary(max_size=300), mutated(RULE_PIECES, pieces=10)))
def test_import_iptables_takes_any_bytes(data: bytes) -> None:
    _import(data)


@settings(deadline=None)
@given(st.text(max_size=300))
def test_import_iptables_parser_takes_any_text(text: str) -> None:
    listeners, _untranslated = parse_rules(text)
    if listeners:  # what it translated renders to a map the loader takes
        parse_config(load_yaml(render_yaml(listeners, _untranslated, source="fuzz"), "x"), "x")


@pytest.mark.parametrize("data", [
    b"\xff\xfe\x00garbage", b"-A PREROUTING -p tcp --dport 1 -j DNAT --to 'unclosed\n",
    b"\x00" * 100, b"*nat\n" + b"-A PREROUTING " * 500 + b"\n",
])
def test_cli_import_of_garbage_exits_2_without_a_traceback(tmp_path: Path, data: bytes) -> None:
    rules = tmp_path / "rules"
    rules.write_bytes(data)
    done = subprocess.run(cacheport_cmd("import-iptables", str(rules)), capture_output=True,
                          text=True, timeout=30, env=cacheport_env(), cwd=ROOT)
    assert done.returncode == 2, done
    assert "Traceback" not in done.stderr
    assert done.stderr.startswith("cacheport: ")


def test_import_of_rules_with_control_characters_writes_a_loadable_map() -> None:
    # Found: a NUL (any C0/C1 control but tab) copied from a rule into the map's comments
    # made the written map invalid YAML ("the translated port map is not valid", exit 2).
    code, err = _import(b"-A PREROUTING -i \x00 -p tcp -m tcp --dport 1 -j DNAT --t 0.0.0.0\n"
                        b"-A PREROUTING -p tcp --dport 2 -j DNAT --to 10.0.0.1:2 -m comment "
                        b"--comment \"a\x7fb\x1bc\"\n")
    assert code == 0, err


if __name__ == "__main__":
    run_under_atheris(globals())  # python -m tests.test_fuzz_operator NAME [atheris args]
