"""The fault schedule: pure and seeded, so a run can be repeated from its printed seed.

Faults are laid out in rounds: each round holds every fault kind once, in a shuffled
order, one per slot with a random offset inside the slot. Reloads (a random valid
edit, now and then an invalid one) tick on their own every few seconds throughout.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

# kind -> what it does (printed with the schedule and in the report).
KINDS: dict[str, str] = {
    "cache_kill": "memcached node SIGKILLed, restarted 2 s later on its port",
    "failover": "Redis replica promoted, the upstream's DNS name pointed at it",
    "reshard": "100 slots moved between two cluster masters (redis-cli --cluster reshard)",
    "node_add_remove": "a 4th cluster node added, given 20 slots, emptied and removed",
    "worker_kill": "one of the 2 workers SIGKILLed (the supervisor restarts it)",
    "client_reset": "40 clients reset (RST) with requests in flight, 40 half-close",
    "blackhole": "a listener's upstream reloaded to a black hole for 5 s, then back",
    "fd_limit": "idle connections opened until a worker is near RLIMIT_NOFILE",
}
SHORT = tuple(KINDS)  # the short form injects every kind once, the long form in rounds
WARMUP = 8.0  # load only, before the first fault
COOLDOWN = 8.0  # load only, after the last fault starts its slot
MIN_SLOT = 6.5


@dataclass(frozen=True)
class Fault:
    kind: str
    at: float  # seconds after the load started


@dataclass(frozen=True)
class Reload:
    at: float
    valid: bool
    edit: str  # which edit: "idle", "extra", "drain" (valid) or "bad-port", "bad-yaml"


@dataclass(frozen=True)
class Schedule:
    seed: int
    duration: float
    faults: tuple[Fault, ...]
    reloads: tuple[Reload, ...]

    def lines(self) -> list[str]:
        out = [f"soak schedule: seed {self.seed}, {self.duration:.0f} s, "
               f"{len(self.faults)} faults, {len(self.reloads)} reloads "
               f"({sum(not r.valid for r in self.reloads)} invalid)"]
        out += [f"  t={f.at:7.1f}s  {f.kind:<16} {KINDS[f.kind]}" for f in self.faults]
        return out


VALID_EDITS = ("idle", "extra", "drain")
INVALID_EDITS = ("bad-port", "bad-yaml")


def make_schedule(seed: int, duration: float, kinds: tuple[str, ...] = SHORT,
                  reload_every: tuple[float, float] = (3.0, 6.0),
                  invalid_share: float = 0.2) -> Schedule:
    """Rounds of ``kinds`` over ``duration`` seconds (at least one round, squeezed if short)."""
    rng = random.Random(seed)
    span = max(duration - WARMUP - COOLDOWN, 1.0)
    per_round = len(kinds) * MIN_SLOT
    rounds = max(1, int(span // per_round))
    slot = span / (rounds * len(kinds))
    faults: list[Fault] = []
    t = WARMUP
    for _ in range(rounds):
        order = list(kinds)
        rng.shuffle(order)
        for kind in order:
            faults.append(Fault(kind, round(t + rng.uniform(0, slot * 0.3), 1)))
            t += slot
    reloads: list[Reload] = []
    t = rng.uniform(*reload_every)
    while t < duration - 2.0:
        valid = rng.random() >= invalid_share
        edit = rng.choice(VALID_EDITS if valid else INVALID_EDITS)
        reloads.append(Reload(round(t, 1), valid, edit))
        t += rng.uniform(*reload_every)
    return Schedule(seed, duration, tuple(faults), tuple(reloads))
