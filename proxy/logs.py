"""How cacheport writes its log: text (the default) or one JSON object per line, and the
connection log, written off the event loop.

::

    logging.* calls ---------------------------------> root handler (stderr) -> Text|Json
    Listener.closed -> ConnectionLog.put (a tuple) -> [bounded queue] -> writer thread
                          full: dropped += 1            (batches) logger "cacheport.connections"

The JSON formatter is ours rather than python-json-logger's: the contract is small and
fixed (``time`` RFC 3339 in UTC with milliseconds, ``level``, ``logger``, ``message``,
``worker``, ``exc`` for a traceback, then the record's own fields), and the library
would need its fields renamed, its time format and exception key overridden -- as many
lines as this, plus a dependency in the image. ``json.dumps`` escapes every newline, so
a record is always one line, a traceback included.

The connection log never blocks the loop or the engine: the loop puts one tuple in a
bounded queue (``put_nowait``); when the writer falls behind, lines are dropped and
counted (``cacheport_log_lines_dropped_total``), never a connection slowed. The record
is built and formatted in the writer thread.
"""

from __future__ import annotations

import contextlib
import json
import logging
import queue
import sys
import threading
import time
from collections.abc import Iterable
from typing import Any

from prometheus_client.core import CounterMetricFamily, Metric

from .config import LogFormat
from .process import worker_id

CONNECTIONS_LOGGER = "cacheport.connections"
QUEUE_SIZE = 10_000  # lines waiting for the writer; beyond, lines are dropped and counted

# What every LogRecord has; anything else on a record is the event's own field.
_STANDARD = frozenset((*logging.LogRecord("", 0, "", 0, "", (), None).__dict__,
                       "message", "asctime", "taskName"))
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: {prefix}%(message)s"
TEXT_DATEFMT = "%Y-%m-%dT%H:%M:%S"


def rfc3339(created: float) -> str:
    """``2026-12-06T06:08:22.123Z``: UTC with milliseconds."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created)) + \
        f".{int(created * 1000) % 1000:03d}Z"


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in record.__dict__.items() if k not in _STANDARD}


class TextFormatter(logging.Formatter):
    """The classic line; an event's own fields (only the connection log has any) follow
    the message as ``key=value``."""

    def __init__(self) -> None:
        worker = worker_id()
        prefix = f"[worker {worker}] " if worker is not None else ""
        super().__init__(TEXT_FORMAT.format(prefix=prefix), TEXT_DATEFMT)

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields = _fields(record)
        if fields:
            line += "".join(f" {k}={'-' if v is None else v}" for k, v in fields.items())
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line."""

    def __init__(self) -> None:
        super().__init__()
        worker = worker_id()
        self.worker: int | str | None = int(worker) if worker and worker.isdigit() else worker

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": rfc3339(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if self.worker is not None:
            out["worker"] = self.worker
        for key, value in _fields(record).items():
            out.setdefault(key, value)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            out["exc"] = record.exc_text
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        return json.dumps(out, default=str, ensure_ascii=False)


def formatter(fmt: LogFormat) -> logging.Formatter:
    return JsonFormatter() if fmt == "json" else TextFormatter()


def setup(level: str, fmt: LogFormat = "text") -> None:
    """The root logger writes to stderr in ``fmt``; called again, it changes the format
    (the port map's ``logging.log_format`` is known only after the file is read)."""
    root = logging.getLogger()
    root.setLevel(getattr(logging, level.upper()))
    ours = [h for h in root.handlers if getattr(h, "cacheport", False)]
    if not ours:
        stream = logging.StreamHandler(sys.stderr)
        stream.cacheport = True  # type: ignore[attr-defined]
        root.addHandler(stream)
        ours = [stream]
    for handler in ours:
        handler.setFormatter(formatter(fmt))
    # log_connections is the switch for connection lines, not --log-level: they are INFO
    # records and must be written under --log-level warning too.
    logging.getLogger(CONNECTIONS_LOGGER).setLevel(logging.INFO)


class RateLimitedLog:
    """Warnings about an event that can repeat per connection (a refusal, a failed dial):
    the first is logged at once, then at most one summary per ``interval`` seconds."""

    def __init__(self, logger: logging.Logger, interval: float = 10.0) -> None:
        self.logger = logger
        self.interval = interval
        self.last = -interval
        self.suppressed = 0

    def warning(self, message: str, *args: object, **fields: object) -> None:
        """``fields`` (listener, client, reason...) go on the record: JSON lines carry them."""
        now = time.monotonic()
        if now - self.last < self.interval:
            self.suppressed += 1
            return
        if self.suppressed:
            message += f" (and {self.suppressed} more since the last report)"
        self.suppressed = 0
        self.last = now
        self.logger.warning(message, *args, extra=fields)


# One closed (or refused) connection, as the loop hands it over: cheap to build.
Line = tuple[float, float, str, str, str | None, int, int, str, bool]


_STOP = object()  # the writer's sentinel
BATCH_WAIT = 0.02  # the writer gathers lines this long after the first: one GIL hand-over
BATCH_MAX = 1024  # per batch rather than one per line (bench connlog has the figures)


class ConnectionLog:
    """One line per closed or refused connection, written by a thread of its own.

    The stdlib's QueueHandler/QueueListener pair, minus two costs: the loop puts a plain
    tuple (no LogRecord, no formatting on the loop), and the writer takes the lines in
    batches, so the event loop hands the GIL over once per batch, not once per line.
    """

    def __init__(self, size: int = QUEUE_SIZE) -> None:
        self.queue: queue.Queue[Any] = queue.Queue(size)
        self.logger = logging.getLogger(CONNECTIONS_LOGGER)
        self.dropped = 0  # lines the full queue turned away (the loop's thread only)
        self.written = 0
        self.failed = 0  # lines the writer could not write (the writer's thread only)
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def put(self, start: float, duration: float, listener: str, client: str,
            upstream: str | None, up: int, down: int, reason: str, refused: bool) -> None:
        """From the event loop: never blocks; a full queue drops the line and counts it."""
        if self._thread is None:
            self.start()
        try:
            self.queue.put_nowait((start, duration, listener, client, upstream, up, down,
                                   reason, refused))
        except queue.Full:
            self.dropped += 1

    def start(self) -> None:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, daemon=True,
                                                name="cacheport-connection-log")
                self._thread.start()

    def stop(self) -> None:
        """Write what is queued, then end the thread (a later ``put`` starts it again)."""
        with self._lock:
            thread, self._thread = self._thread, None
        if thread is not None:
            self.queue.put(_STOP)  # waits for room: the writer is draining
            thread.join(10)

    def _run(self) -> None:
        q = self.queue
        while True:
            batch = [q.get()]
            if batch[0] is not _STOP:
                time.sleep(BATCH_WAIT)
            with contextlib.suppress(queue.Empty):
                while len(batch) < BATCH_MAX and batch[-1] is not _STOP:
                    batch.append(q.get_nowait())
            for line in batch:
                if line is _STOP:
                    return
                try:
                    self.write(line)
                except Exception:  # a broken handler must not end the thread
                    self.failed += 1

    def write(self, line: Line) -> None:
        """In the writer thread: the record, formatted by the root's handlers."""
        start, duration, listener, client, upstream, up, down, reason, refused = line
        logger = self.logger
        if not logger.isEnabledFor(logging.INFO):
            return
        record = logger.makeRecord(
            CONNECTIONS_LOGGER, logging.INFO, "", 0,
            "connection refused" if refused else "connection closed", (), None,
            extra={"listener": listener, "client": client, "upstream": upstream,
                   "start": rfc3339(start), "duration": round(duration, 6),
                   "bytes_upstream": up, "bytes_downstream": down, "reason": reason})
        record.created = start + duration
        record.msecs = (record.created - int(record.created)) * 1000
        logger.handle(record)
        self.written += 1


CONNECTIONS = ConnectionLog()  # the process's; listeners put into it


class LogCollector:
    """``cacheport_log_lines_dropped_total``: connection log lines a full queue dropped
    (or the writer failed to write)."""

    def __init__(self, log: ConnectionLog = CONNECTIONS) -> None:
        self.log = log

    def collect(self) -> Iterable[Metric]:
        family = CounterMetricFamily(
            "cacheport_log_lines_dropped", "Connection log lines dropped because the "
            "writer fell behind (the queue was full)")
        family.add_metric([], self.log.dropped + self.log.failed)
        yield family
