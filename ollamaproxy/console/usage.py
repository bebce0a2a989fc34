# -*- test-case-name: tests.console.test_usage_view -*-
"""
The console's questions to the usage store, answered off the reactor
thread by the store's own worker, after the writes given before them.

One class, so that another database behind the store takes them over by
answering the same three questions.
"""

from __future__ import annotations

from functools import partial

from twisted.internet.defer import Deferred

from ollamaproxy import usage_db
from ollamaproxy.console.views import Bucket, SeriesRow
from ollamaproxy.usage import UsageStore


class StoreUsage:
    """
    A L{ollamaproxy.console.web.UsageReader} over a L{UsageStore}.
    """

    def __init__(self, store: UsageStore) -> None:
        self._store = store

    def series(self, since: float, until: float, bucket: Bucket) -> Deferred[list[SeriesRow]]:
        return self._store.read(partial(usage_db.series, self._store.path, since, until, bucket))

    def last_used(self) -> Deferred[dict[str, float]]:
        return self._store.read(partial(usage_db.last_used, self._store.path))

    def tokens_by_key(self, since: float) -> Deferred[dict[str, int]]:
        return self._store.read(partial(usage_db.tokens_by_key, self._store.path, since))
