"""What every layer may know about the running process: which worker it is, how many
workers share the machine, and how a worker tells the supervisor it is ready.

The supervisor sets these variables when it starts a worker (``workers: N``); a
single process sees none of them. Nothing here imports the rest of the package.
"""

from __future__ import annotations

import os

READY_FD_ENV = "CACHEPORT_READY_FD"  # a pipe the worker writes "ready <admin>" to, once
WORKER_ID_ENV = "CACHEPORT_WORKER_ID"  # this worker's index, 0..N-1
WORKERS_ENV = "CACHEPORT_WORKERS"  # processes sharing the CPUs


def worker_id() -> str | None:
    """This worker's index as the supervisor set it; None in a single process."""
    return os.environ.get(WORKER_ID_ENV)


def worker_count() -> int:
    """How many worker processes share this machine's CPUs (1 without a supervisor)."""
    try:
        return max(int(os.environ.get(WORKERS_ENV, "1")), 1)
    except ValueError:
        return 1


def notify_ready(admin: object | None = None) -> None:
    """Called by a worker once every listener is bound; says where its admin endpoint is."""
    fd = os.environ.get(READY_FD_ENV)
    if fd is None:
        return
    try:
        os.write(int(fd), f"ready {admin or '-'}\n".encode())
        os.close(int(fd))
    except (OSError, ValueError):
        pass
