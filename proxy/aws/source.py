"""The ``aws:`` source: clusters read from the ElastiCache API, re-read every interval.

::

    every interval: boto3 (in a thread) --> select --> translate(keep=blocks so far)
        same entries as applied: nothing
        new entries: reload with the port map's text + those entries (validated like
                     any reload); invalid, or the API unreadable: the running map stays

A cache keeps its block of ports for as long as the process runs (``keep``), also after
it disappeared, so a cache created later never takes a port a client may still hold.
Entries that need a secret (AUTH token, RBAC) are left out and logged: write those by
hand (``cacheport import-aws`` prints them with a ``health:`` block to fill in).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import yaml

from ..config import AwsConfig
from .fetch import AwsError, client, read_account, tag_reader
from .render import entry_dicts
from .translate import TranslateError, select, translate

log = logging.getLogger("cacheport.aws")


@dataclass(frozen=True)
class Entries:
    """What the API gave, as port map entries (plain YAML data)."""

    clusters: list[dict[str, Any]] = field(default_factory=list)
    listeners: list[dict[str, Any]] = field(default_factory=list)

    @property
    def names(self) -> list[str]:
        return [e["name"] for e in (*self.clusters, *self.listeners)]


def extend_text(text: str, entries: Entries) -> str:
    """The port map's text with ``entries`` appended to its clusters and listeners."""
    document = yaml.safe_load(text) or {}
    if not isinstance(document, dict):
        return text  # not a mapping: let the loader say so
    for key, extra in (("clusters", entries.clusters), ("listeners", entries.listeners)):
        if extra:
            document[key] = [*(document.get(key) or []), *extra]
    return yaml.safe_dump(document, sort_keys=False)


class AwsSource:
    """Reads the API (blocking; run it in a thread) and remembers what was applied."""

    def __init__(self, config: AwsConfig, api: Callable[[], Any] | None = None) -> None:
        self.config = config
        self._api_factory = api or (lambda: client(config.region, config.profile))
        self._api: Any = None
        self.blocks: dict[str, tuple[int, int]] = {}
        self.applied: Entries | None = None
        self.candidate: Entries | None = None
        self.reads = 0
        self.read_failures = 0
        self.last_error: str | None = None

    def read(self) -> Entries:
        """One read of the API; raises ``AwsError``. Blocking."""
        if self._api is None:
            self._api = self._api_factory()
        cfg = self.config
        account = read_account(self._api)
        tags = dict(cfg.tags)
        tags_of = tag_reader(self._api)
        try:
            result = translate(select(account.groups, cfg.ids, tags, tags_of),
                               select(account.cache_clusters, cfg.ids, tags, tags_of),
                               select(account.serverless, cfg.ids, tags, tags_of),
                               first_port=cfg.first_port, keep=self.blocks)
        except TranslateError as exc:
            raise AwsError(str(exc)) from None
        self.blocks.update(result.blocks)
        for item in result.untranslated:
            if item.needed:
                log.warning("aws: %s: %s", item.source, item.reason)
        clusters, listeners = entry_dicts(result, cfg.announce, cfg.listen)
        return Entries(clusters, listeners)

    def extend(self, text: str) -> str:
        """For the loader: the file's text plus the entries being applied / applied."""
        entries = self.candidate if self.candidate is not None else self.applied
        return extend_text(text, entries) if entries is not None else text

    async def poll_once(self, reload: Callable[[], Awaitable[object]]) -> bool:
        """Read; when the entries changed, reload through ``reload`` (which raises on a
        port map that does not validate or bind). True when a reload applied them."""
        try:
            entries = await asyncio.to_thread(self.read)
        except AwsError as exc:
            self.read_failures += 1
            if str(exc) != self.last_error:
                log.error("aws: cannot read the ElastiCache API: %s; the running port map is "
                          "unchanged", exc)
            self.last_error = str(exc)
            return False
        self.reads += 1
        self.last_error = None
        if entries == self.applied:
            return False
        self.candidate = entries
        try:
            await reload()
        except Exception as exc:  # ConfigError / ReloadError: said, and nothing changed
            log.error("aws: the caches read (%s) do not make a valid port map: %s; the "
                      "running port map is unchanged", ", ".join(entries.names) or "none", exc)
            return False
        finally:
            self.candidate = None
        log.info("aws: port map now has %s", ", ".join(entries.names) or "no cache")
        self.applied = entries
        return True

    async def run(self, reload: Callable[[], Awaitable[object]]) -> None:
        """Poll at once, then every ``interval``, until cancelled."""
        while True:
            await self.poll_once(reload)
            await asyncio.sleep(self.config.interval)
