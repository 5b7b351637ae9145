"""Active health checks: a pure up/down state machine, one checker per protocol, a monitor.

``state`` decides (no I/O), ``wire`` says what a check sends and how its reply is
judged (no I/O), ``checks`` and ``prober`` talk to nodes, ``monitor`` schedules one
check per distinct node and reports. Listeners only ask
``HealthMonitor.state(listener, upstream)``.
"""

from .checks import (
    Checker,
    CheckResult,
    MemcachedChecker,
    RedisChecker,
    TcpChecker,
    WireChecker,
)
from .monitor import HealthMonitor, Target
from .state import HealthState, State, Transition, choose_upstream

__all__ = [
    "CheckResult",
    "Checker",
    "HealthMonitor",
    "HealthState",
    "MemcachedChecker",
    "RedisChecker",
    "State",
    "Target",
    "TcpChecker",
    "Transition",
    "WireChecker",
    "choose_upstream",
]
