"""Group commits: the changes that wait together are committed together, one fsync for all.

One of their callers leads: it commits what waits in a native thread, while the others wait in
the event loop for it to wake them. Each change runs in a savepoint of its own, so that one
refused leaves the others as they were.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from gateway.fleet.store import off_the_event_loop
from gateway.jobs.records import JobError
from gateway.jobs.sqlite import SQLiteFile, native_lock

T = TypeVar("T")
FOLLOW_SECONDS = 1.0  # the longest a caller waits for a leader to commit its operation before it leads


class _Pending:
    """One operation waiting for the next group commit: what to run, and what came of it."""

    __slots__ = ("args", "done", "error", "func", "outcome", "turn")

    def __init__(self, func: Callable[..., Any], args: tuple[Any, ...]) -> None:
        self.func, self.args = func, args
        self.done = False
        self.outcome: Any = None
        self.error: Exception | None = None
        self.turn = threading.Event()  # gevent's under gevent: set by a leader, in the event loop's thread


class GroupCommits(SQLiteFile):
    """A SQLite file whose changes that wait together share one transaction, led by one of their callers."""

    # Kept in memory beside the file by the job store (JobFile, store_file.py): put back when a batch rolls back.
    _seq: int
    _bytes: int
    _queued_counts: dict[int, int]

    def __init__(self, path: str | os.PathLike[str]) -> None:
        super().__init__(path)
        self._pending_lock = native_lock()
        self._pending: list[_Pending] = []
        self._leading = False  # a caller is committing the pending operations, or has been handed the lead

    def _batched(self, func: Callable[..., T], *args: Any) -> T:
        """Run `func(*args)` in the next group commit: the operations that wait together share one fsync.

        Each runs in a savepoint of its own, so that one refused (a JobError: a stale lease, a full
        store) leaves the others as they were; any other failure rolls the whole batch back.

        One caller at a time leads: it commits what waits in a native thread, then wakes the callers
        it committed for and hands the lead to the first that came meanwhile. The others wait where
        they are, not each in a thread of the pool: under gevent, a pool thread per operation cost
        a drain 7 thread switches per job and more CPU than its SQL. A wait that outlasts
        FOLLOW_SECONDS (its leader was killed) leads itself: any number of callers may commit at once.
        """
        entry = _Pending(func, args)
        with self._pending_lock:
            self._pending.append(entry)
            lead, self._leading = not self._leading, True
        if not lead:
            entry.turn.wait(FOLLOW_SECONDS)
        if not entry.done:
            self._lead(entry)
        if entry.error is not None:
            raise entry.error
        outcome: T = entry.outcome
        return outcome

    def _lead(self, entry: _Pending) -> None:
        """Commit what waits (`entry` among it), then wake those committed and the next leader."""
        batch: list[_Pending] = []
        try:
            batch = off_the_event_loop(self._commit_pending, entry)
        finally:
            with self._pending_lock:
                # Not `entry`: still pending only if this caller was stopped before its commit began.
                successor = next((item for item in self._pending if item is not entry), None)
                self._leading = successor is not None
            for item in batch:
                item.turn.set()
            if successor is not None:
                successor.turn.set()

    def _commit_pending(self, entry: _Pending) -> list[_Pending]:
        """Commit every operation waiting now, in one transaction: one fsync for all of them; those committed."""
        with self._lock:
            if entry.done:  # a leader before this one committed it with its own batch
                return []
            with self._pending_lock:
                batch, self._pending = self._pending, []
            seq, stored, queued = self._seq, self._bytes, dict(self._queued_counts)
            self._db.execute("BEGIN IMMEDIATE")
            try:
                for item in batch:
                    self._db.execute("SAVEPOINT op")
                    try:
                        item.outcome = item.func(*item.args)
                    except JobError as exc:
                        self._db.execute("ROLLBACK TO op")
                        item.error = exc
                    self._db.execute("RELEASE op")
                self._db.execute("COMMIT")
            except BaseException as exc:  # every operation of the batch is told, and none of it is kept
                self._db.execute("ROLLBACK")
                self._seq, self._bytes, self._queued_counts = seq, stored, queued
                for item in batch:
                    item.outcome, item.error = None, exc if isinstance(exc, Exception) else RuntimeError(str(exc))
                    item.done = True
                if not isinstance(exc, Exception):
                    raise
                return batch
            for item in batch:
                item.done = True
            return batch
