"""Active health checks: a pure up/down state machine, one checker per protocol, a monitor.

``state`` decides (no I/O), ``checks`` talks to nodes, ``monitor`` schedules and
reports. Listeners only ask ``HealthMonitor.state(listener, upstream)``.
"""

from .checks import Checker, CheckResult, MemcachedChecker, RedisChecker, TcpChecker
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
    "choose_upstream",
]
