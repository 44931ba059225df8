"""Answers kept until the database changes: for the reads staff tools poll (the ECR list).

Per connection, so per thread. Validity is exact, not a time-to-live: SQLite's `PRAGMA
data_version` moves when any other connection commits, and the connection's own
`total_changes` when it writes itself, so a kept answer is served only while no commit has
happened anywhere since it was computed.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import TypeVar

from gateway.store.db import Database

T = TypeVar("T")


class Fresh:
    def __init__(self, db: Database, size: int = 64) -> None:
        self.db = db
        self.size = size
        self._kept: OrderedDict[Hashable, tuple[tuple[int, int], object]] = OrderedDict()

    def get(self, key: Hashable, make: Callable[[], T]) -> T:
        # Read before computing: a commit landing in between makes the stamp older than the
        # answer, so the next call recomputes; an answer older than its stamp cannot happen.
        stamp = (int(self.db.value("PRAGMA data_version")), self.db.conn.total_changes)
        kept = self._kept.get(key)
        if kept is not None and kept[0] == stamp:
            self._kept.move_to_end(key)
            return kept[1]  # type: ignore[return-value]
        value = make()
        self._kept[key] = (stamp, value)
        while len(self._kept) > self.size:
            self._kept.popitem(last=False)
        return value
