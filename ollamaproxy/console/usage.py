# -*- test-case-name: tests.console.test_usage_view -*-
"""
The console's questions to the usage store, answered by its database
(SQLite or PostgreSQL, L{ollamaproxy.record.usage.UsageDatabase}) on the store's
own worker, off the reactor thread, after the writes given before them.
"""

from __future__ import annotations

from twisted.internet.defer import Deferred

from ollamaproxy.record.usage import UsageStore
from ollamaproxy.record.usage_db import Bucket, SeriesRow


class StoreUsage:
    """
    A L{ollamaproxy.console.web.UsageReader} over a L{UsageStore}.
    """

    def __init__(self, store: UsageStore) -> None:
        self._store = store

    def series(self, since: float, until: float, bucket: Bucket) -> Deferred[list[SeriesRow]]:
        database = self._store.database
        return self._store.read(lambda: database.series(since, until, bucket))

    def last_used(self) -> Deferred[dict[str, float]]:
        return self._store.read(self._store.database.last_used)

    def tokens_by_key(self, since: float) -> Deferred[dict[str, int]]:
        database = self._store.database
        return self._store.read(lambda: database.tokens_by_key(since))
