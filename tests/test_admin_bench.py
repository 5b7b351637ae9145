"""``python -m bench admin-hold`` and ``admin-http`` run end to end on a small scale."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import ROOT

pytestmark = pytest.mark.timeout(120)


def bench(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT), TMPDIR=str(tmp_path))
    return subprocess.run([sys.executable, "-m", "bench", *args], capture_output=True,
                          text=True, timeout=100, cwd=ROOT, env=env)


def test_admin_hold_measures_each_path_at_each_size(tmp_path: Path) -> None:
    result = bench(tmp_path, "admin-hold", "--sizes", "5,20", "--reps", "2", "--no-save")
    assert result.returncode == 0, result.stderr
    rows = [line for line in result.stdout.splitlines() if line.startswith("| this |")]
    assert len(rows) == 6
    assert all("| 200, " in row for row in rows), rows
    assert not list(tmp_path.glob("cacheport-admin-hold-*"))  # its work folder is gone


def test_admin_http_measures_the_own_server_with_or_without_aiohttp(tmp_path: Path) -> None:
    result = bench(tmp_path, "admin-http", "--requests", "50", "--reps", "1", "--cap", "8")
    assert result.returncode == 0, result.stderr
    [own] = [line for line in result.stdout.splitlines() if line.startswith("| own |")]
    assert re.search(r"\| [56]\.\d s \|", own), own  # READ_TIMEOUT, plus a loaded host's delay
    assert "413 Payload Too Large" in own
