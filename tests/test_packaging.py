"""The container image and the systemd unit, checked where Docker and systemd cannot run.

The Dockerfile installs cacheport with scripts/install-venv.sh; this test runs that
same script into a fresh virtualenv, so a green run means the image's step works.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

from tests.support import ROOT

DOCKERFILE = (ROOT / "Dockerfile").read_text()
UNIT = (ROOT / "deploy" / "cacheport.service").read_text()


def instructions(name: str) -> list[str]:
    joined = re.sub(r"\\\n", " ", DOCKERFILE)
    return [line.split(None, 1)[1] for line in joined.splitlines()
            if line.strip().upper().startswith(name + " ")]


def test_dockerfile_shape() -> None:
    assert len(instructions("FROM")) == 2  # multi-stage
    assert all("slim" in base for base in instructions("FROM"))
    entrypoint = json.loads(instructions("ENTRYPOINT")[0])  # exec form: signals reach us
    assert entrypoint == ["cacheport", "run", "-c", "/etc/cacheport/cacheport.yaml"]
    assert instructions("USER") == ["cacheport"]
    assert any("scripts/install-venv.sh" in run for run in instructions("RUN"))
    healthcheck = instructions("HEALTHCHECK")[0]
    assert "/healthz" in healthcheck and "CMD" in healthcheck
    assert instructions("LABEL")


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
