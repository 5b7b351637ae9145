"""The log's formats: text by default, one JSON object per line with --log-format json or
``logging.log_format`` (the flag wins), workers included; the connection log's queue."""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from prometheus_client import generate_latest
from prometheus_client.registry import CollectorRegistry

from proxy import closes
from proxy.logs import CONNECTIONS_LOGGER, ConnectionLog, JsonFormatter, LogCollector, TextFormatter
from tests.support import CacheportProcess, free_port, wait_until


def _record(msg: str = "listener %s started", *args: object,
            exc: bool = False, **extra: object) -> logging.LogRecord:
    info = None
    if exc:
        try:
            raise ValueError("line one\nline two")
        except ValueError:
            info = sys.exc_info()
    record = logging.LogRecord("cacheport.listener", logging.WARNING, __file__, 1, msg,
                               args or ("rd",), info)
    record.__dict__.update(extra)
    return record


def test_json_line_has_the_stable_fields() -> None:
    line = JsonFormatter().format(_record(listener="rd", reason=closes.NOT_ALLOWED))
    assert "\n" not in line
    obj = json.loads(line)
    assert obj["level"] == "warning" and obj["logger"] == "cacheport.listener"
    assert obj["message"] == "listener rd started"
    assert obj["listener"] == "rd" and obj["reason"] == "not_allowed"
    # RFC 3339, UTC, milliseconds: 2026-12-06T06:08:22.123Z
    assert len(obj["time"]) == 24 and obj["time"].endswith("Z") and obj["time"][19] == "."


def test_a_traceback_goes_into_exc_on_the_same_line() -> None:
    line = JsonFormatter().format(_record(exc=True))
    assert line.count("\n") == 0
    obj = json.loads(line)
    assert "Traceback" in obj["exc"] and "ValueError: line one\nline two" in obj["exc"]


def test_text_stays_the_classic_line_with_fields_after_the_message() -> None:
    text = TextFormatter().format(_record())
    assert text.endswith(" WARNING cacheport.listener: listener rd started")
    with_fields = TextFormatter().format(_record(listener="rd", upstream=None))
    assert with_fields.endswith("listener rd started listener=rd upstream=-")


def _port_map(tmp_path: Path, **top: object) -> Path:
    upstream = free_port()  # nothing listens: no connection is made in these tests
    doc = {"admin": False, "defaults": {"health": False},
           "listeners": [{"name": "t", "listen": "127.0.0.1:0",
                          "upstream": f"127.0.0.1:{upstream}"}], **top}
    path = tmp_path / "ports.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def _run_until_serving(path: Path, *extra: str) -> str:
    proc = CacheportProcess(path, *extra)
    try:
        proc.wait_serving()
        if "--workers" in extra:
            # The supervisor's line and each worker's.
            wait_until(lambda: proc.log().count("cacheport serving") >= 3, 20,
                       message="both workers serving")
    finally:
        proc.stop()
    return proc.log()


def _json_lines(log: str) -> list[dict[str, object]]:
    lines = [line for line in log.splitlines() if line.strip()]
    assert lines
    return [json.loads(line) for line in lines]  # every line, or this raises


def test_log_format_json_writes_one_object_per_line(tmp_path: Path) -> None:
    objs = _json_lines(_run_until_serving(_port_map(tmp_path), "--log-format", "json"))
    assert any("cacheport serving" in str(o["message"]) for o in objs)
    assert all({"time", "level", "logger", "message"} <= o.keys() for o in objs)


def test_the_port_maps_log_format_applies_and_the_flag_beats_it(tmp_path: Path) -> None:
    path = _port_map(tmp_path, logging={"log_format": "json"})
    _json_lines(_run_until_serving(path))
    text = _run_until_serving(path, "--log-format", "text")
    first = text.splitlines()[0]
    assert not first.startswith("{") and " INFO cacheport" in first


def test_workers_write_json_with_their_worker_field(tmp_path: Path) -> None:
    objs = _json_lines(_run_until_serving(_port_map(tmp_path, logging={"log_format": "json"}),
                                          "--workers", "2"))
    workers = {o.get("worker") for o in objs if "worker" in o}
    assert workers == {0, 1}, objs


# -- the connection log's queue ------------------------------------------------------


class _Blocked(logging.Handler):
    """Holds the writer thread until released: the queue behind it fills."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = threading.Event()
        self.lines: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.gate.wait(10)
        self.lines.append(record)


def test_a_full_queue_drops_lines_counts_them_and_never_blocks() -> None:
    logger = logging.getLogger(CONNECTIONS_LOGGER)
    blocked = _Blocked()
    logger.addHandler(blocked)
    old_level = logger.level
    logger.setLevel(logging.INFO)
    log = ConnectionLog(size=4)
    try:
        start = time.monotonic()
        for i in range(1000):
            log.put(time.time(), 0.001, "t", f"127.0.0.1:{i}", "127.0.0.1:6379", 1, 2,
                    closes.CLIENT_CLOSED, False)
        took = time.monotonic() - start
        assert took < 5, took  # ~1 us a line; one blocking put would wait 10 s
        # The writer holds at most one line, the queue four: the rest were dropped.
        assert 995 <= log.dropped <= 996
        registry = CollectorRegistry()
        registry.register(LogCollector(log))
        text = generate_latest(registry).decode()
        assert f"cacheport_log_lines_dropped_total {float(log.dropped)}" in text
    finally:
        blocked.gate.set()
        log.stop()
        logger.removeHandler(blocked)
        logger.setLevel(old_level)
    assert len(blocked.lines) == 1000 - log.dropped
    assert blocked.lines[0].client == "127.0.0.1:0"  # type: ignore[attr-defined]


@pytest.mark.parametrize("reason", list(closes.CLOSES) + list(closes.REFUSALS))
def test_reasons_are_snake_case_label_values(reason: str) -> None:
    assert reason.replace("_", "").isalpha() and reason == reason.lower()


def test_the_reason_table_in_the_docs_lists_every_reason() -> None:
    text = (Path(__file__).resolve().parent.parent / "docs" / "operating.md").read_text()
    table = {line.split("|")[1].strip().strip("`") for line in text.splitlines()
             if line.startswith("| `")}
    assert set(closes.CLOSES) | set(closes.REFUSALS) <= table
