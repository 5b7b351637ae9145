"""The container image's files and the systemd unit, checked without running them.

The Dockerfile installs cacheport with scripts/install-venv.sh; a test here runs that
same script into a fresh virtualenv. deploy/compose.yaml is validated by docker-compose
and is the one source of the container's settings: tests/test_container.py runs the
image with them, and the run lines of docs/container.md must say the same.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from proxy.config import load_config
from tests.container_engine import COMPOSE, compose_run_options
from tests.support import ROOT

DOCKERFILE = (ROOT / "Dockerfile").read_text()
UNIT = (ROOT / "deploy" / "cacheport.service").read_text()
GUIDE = (ROOT / "docs" / "container.md").read_text()
HEALTHCHECK = ["CMD", "cacheport", "healthcheck", "-c", "/etc/cacheport/cacheport.yaml"]


def instructions(name: str) -> list[str]:
    joined = re.sub(r"\\\n", " ", DOCKERFILE)
    return [line.split(None, 1)[1] for line in joined.splitlines()
            if line.strip().upper().startswith(name + " ")]


def test_dockerfile_shape() -> None:
    joined = re.sub(r"\\\n", " ", DOCKERFILE)
    assert re.search(r"^ARG BASE_IMAGE=python:3\.11-slim$", joined, re.M)  # docker build .
    assert instructions("FROM") == ["${BASE_IMAGE} AS build", "${BASE_IMAGE}"]  # multi-stage
    entrypoint = json.loads(instructions("ENTRYPOINT")[0])  # exec form: signals reach us
    assert entrypoint == ["cacheport", "run", "-c", "/etc/cacheport/cacheport.yaml"]
    assert instructions("USER") == ["10001:10001"]  # numeric, for runAsNonRoot
    assert instructions("VOLUME") == ['["/var/lib/cacheport"]']
    install = next(run for run in instructions("RUN") if "scripts/install-venv.sh" in run)
    assert "import proxy.relay._engine" in install  # the engine is required in the image
    assert "PIP_CONSTRAINT=" in install and "PIP_BUILD_CONSTRAINT=" in install
    final = joined.split("\nFROM ${BASE_IMAGE}\n", 1)[1]
    assert "gcc" not in final and "--uid 10001" in final and "--gid 10001" in final
    _timing, command = instructions("HEALTHCHECK")[0].split(" CMD ")
    assert ["CMD", *json.loads(command)] == HEALTHCHECK
    assert instructions("LABEL")


def test_build_pins_pip_and_setuptools() -> None:
    pins = (ROOT / "scripts" / "image-constraints.txt").read_text()
    assert re.search(r"^pip==\d", pins, re.M) and re.search(r"^setuptools==\d", pins, re.M)


def test_dockerignore_sends_only_what_the_build_copies() -> None:
    lines = [line for line in (ROOT / ".dockerignore").read_text().splitlines()
             if line and not line.startswith("#")]
    assert lines[0] == "*"  # everything out (.git, .venv, tests, bench), then back in:
    kept = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    copied = {word.rstrip("/") for copy in instructions("COPY") if "--from" not in copy
              for word in copy.split()[:-1]}
    assert copied <= kept, copied - kept


def test_container_map_keeps_state_in_the_volume_and_drains_within_the_stop_timeout() -> None:
    config = load_config(str(ROOT / "config" / "container.yaml"))
    assert config.state_dir == "/var/lib/cacheport"
    assert config.admin is not None
    options = compose_run_options()
    assert config.drain_timeout < int(options[options.index("--stop-timeout") + 1])


@pytest.mark.timeout(60)
def test_compose_file_validates_and_says_what_the_image_needs() -> None:
    compose = shutil.which("docker-compose")
    if compose is None:
        if os.environ.get("CI") == "true":
            pytest.fail("docker-compose is not installed; scripts/test.sh installs it")
        pytest.skip("docker-compose is not installed (scripts/test.sh installs it)")
    result = subprocess.run([compose, "-f", str(COMPOSE), "config"], capture_output=True,
                            text=True, timeout=50, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    service = yaml.safe_load(result.stdout)["services"]["cacheport"]
    assert service["network_mode"] == "host" and service["read_only"] is True
    assert service["restart"] == "unless-stopped"
    assert service["ulimits"]["nofile"]["hard"] >= 65536
    assert service["healthcheck"]["test"] == HEALTHCHECK
    assert "/etc/cacheport:/etc/cacheport:ro" in service["volumes"]
    assert any(v.startswith("cacheport-state:/var/lib/cacheport") for v in service["volumes"])
    assert service["build"]["args"]["BASE_IMAGE"] == "python:3.11-slim"


def _run_lines(text: str) -> list[list[str]]:
    joined = re.sub(r"\\\n\s*", " ", text)
    return [shlex.split(line.strip()) for line in joined.splitlines()
            if re.match(r"\s+(docker|podman) run ", line)]


def test_guide_run_lines_say_what_compose_says() -> None:
    """docs/container.md's docker and podman lines (and the Dockerfile's) carry exactly the
    compose file's settings, which are the ones tests/test_container.py runs the image with."""
    lines = _run_lines(GUIDE)
    assert {line[0] for line in lines} == {"docker", "podman"}
    lines += _run_lines(re.sub(r"^#", "", DOCKERFILE, flags=re.M))  # its header comment
    assert len(lines) == 3
    expected = compose_run_options()
    pairs = {tuple(expected[i:i + 2]) for i in range(len(expected) - 1)
             if expected[i].startswith("-") and not expected[i + 1].startswith("-")}
    flags = {opt for opt in expected if opt.startswith("-")}
    for words in lines:
        assert words[1:3] == ["run", "-d"] and words[-1] == "cacheport", words
        options = words[3:-1]
        assert options[:2] == ["--name", "cacheport"]
        options = options[2:]
        assert {o for o in options if o.startswith("-")} == flags, words
        got = {tuple(options[i:i + 2]) for i in range(len(options) - 1)
               if options[i].startswith("-") and not options[i + 1].startswith("-")}
        assert got == pairs, words


def test_systemd_unit_essentials() -> None:
    settings = dict(line.split("=", 1) for line in UNIT.splitlines()
                    if "=" in line and not line.startswith("#"))
    assert settings["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert settings["Restart"] == "on-failure"
    assert int(settings["LimitNOFILE"]) >= 65536
    assert settings["User"] == "cacheport"
    assert settings["NoNewPrivileges"] == "yes"
    assert settings["ProtectSystem"] == "strict"
    assert settings["ExecStart"].endswith("cacheport run -c /etc/cacheport/cacheport.yaml")


@pytest.mark.timeout(300)
def test_image_install_step_installs_a_working_cacheport(tmp_path: Path) -> None:
    venv = tmp_path / "opt-cacheport"
    result = subprocess.run([str(ROOT / "scripts" / "install-venv.sh"), str(venv)],
                            capture_output=True, text=True, timeout=280)
    assert result.returncode == 0, result.stderr
    check = subprocess.run([str(venv / "bin" / "cacheport"), "check",
                            str(ROOT / "config" / "example.yaml")],
                           capture_output=True, text=True, timeout=30, cwd=tmp_path)
    assert check.returncode == 0, check.stderr
    assert "OK, 5 listener(s)" in check.stdout


def test_both_engine_builds_load_where_ci_builds_them() -> None:
    """The extensions are optional (a machine without a compiler or libssl's headers still
    installs), so a build that breaks would only show as skipped tests: CI, which has both,
    insists that each one imports."""
    import importlib

    from proxy.relay.engine import native_available, native_tls_available

    if os.environ.get("CI") != "true":
        pytest.skip("only CI promises a compiler and libssl-dev (scripts/bootstrap.sh)")
    for name in ("proxy.relay._engine", "proxy.relay._engine_tls"):
        importlib.import_module(name)  # an unresolved symbol fails here, by name
    assert native_available() and native_tls_available()
