"""What a reload changes, decided from two validated configs without touching a socket.

Listeners are matched by name. A listener whose ``listen`` address moved is
removed and added again (a new socket); one whose other settings changed is
reconfigured in place, keeping its socket and its live connections; the rest
are left untouched.
"""

from __future__ import annotations

from dataclasses import dataclass

from .config import Config, ListenerConfig


@dataclass(frozen=True)
class ReloadPlan:
    added: tuple[ListenerConfig, ...]
    removed: tuple[ListenerConfig, ...]
    changed: tuple[ListenerConfig, ...]  # the new configs of listeners kept in place
    unchanged: tuple[str, ...]

    @property
    def empty(self) -> bool:
        return not (self.added or self.removed or self.changed)

    def summary(self) -> str:
        def names(items: tuple[ListenerConfig, ...]) -> str:
            return ", ".join(lc.name for lc in items) or "none"

        return (f"added: {names(self.added)}; removed: {names(self.removed)}; "
                f"changed: {names(self.changed)}; unchanged: {len(self.unchanged)}")


def plan_reload(old: Config, new: Config) -> ReloadPlan:
    old_by_name = {lc.name: lc for lc in old.listeners}
    new_by_name = {lc.name: lc for lc in new.listeners}
    added: list[ListenerConfig] = []
    removed: list[ListenerConfig] = []
    changed: list[ListenerConfig] = []
    unchanged: list[str] = []
    for name, before in old_by_name.items():
        after = new_by_name.get(name)
        if after is None:
            removed.append(before)
        elif after.listen != before.listen:
            removed.append(before)
            added.append(after)
        elif after != before:
            changed.append(after)
        else:
            unchanged.append(name)
    added += [lc for name, lc in new_by_name.items() if name not in old_by_name]
    return ReloadPlan(tuple(added), tuple(removed), tuple(changed), tuple(unchanged))
