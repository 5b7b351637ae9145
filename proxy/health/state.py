"""The up/down decision: rise/fall counting over check results, with no I/O.

::

    check results --record()--> HealthState --Transition--> monitor (logs, metrics)
                                     |
                                   .state --choose_upstream()--> listener (new connections)

A node starts UNKNOWN and takes the verdict of its first check at once, so a
node that is dead when cacheport starts refuses clients within one check. After
that it takes ``fall`` consecutive failures to go DOWN and ``rise`` consecutive
successes to come back UP (HAProxy's ``fall``/``rise``); any result that agrees
with the current state resets the count, so one lost check never flips a node.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TypeVar


class State(enum.Enum):
    UNKNOWN = "unknown"
    UP = "up"
    DOWN = "down"

    def __str__(self) -> str:
        return self.name


@dataclass(frozen=True, slots=True)
class Transition:
    """A change of state, with the reason of the check that decided it."""

    old: State
    new: State
    reason: str
    checks: int  # how many consecutive checks led to it

    @property
    def is_flip(self) -> bool:
        """UP <-> DOWN; the first verdict after UNKNOWN is not counted as a change."""
        return self.old is not State.UNKNOWN


class HealthState:
    """Consecutive-result counting for one upstream."""

    __slots__ = ("fall", "rise", "state", "streak")

    def __init__(self, rise: int, fall: int) -> None:
        if rise < 1 or fall < 1:
            raise ValueError("rise and fall must be at least 1")
        self.rise = rise
        self.fall = fall
        self.state = State.UNKNOWN
        self.streak = 0  # consecutive results that disagree with ``state``

    def record(self, ok: bool, reason: str) -> Transition | None:
        """Take one check result; return the transition it caused, if any."""
        old = self.state
        if old is State.UNKNOWN:
            self.state = State.UP if ok else State.DOWN
            return Transition(old, self.state, reason, 1)
        if ok == (old is State.UP):
            self.streak = 0
            return None
        self.streak += 1
        if self.streak < (self.rise if ok else self.fall):
            return None
        checks, self.streak = self.streak, 0
        self.state = State.UP if ok else State.DOWN
        return Transition(old, self.state, reason, checks)


T = TypeVar("T")


def choose_upstream(candidates: Iterable[tuple[T, State | None]]) -> T | None:
    """The first candidate that is not DOWN (``None`` state: not checked, always usable).

    Candidates come in configured order, upstream first and then the backups, so
    new connections return to the upstream as soon as it is UP again. ``None``
    when every one is DOWN: the client is refused at once.
    """
    for candidate, state in candidates:
        if state is not State.DOWN:
            return candidate
    return None
