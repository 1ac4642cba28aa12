"""One SQLite file used from native threads: opened (a corrupt one moved aside), one transaction at a time."""

from __future__ import annotations

import logging
import os
import sqlite3
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from gateway.fleet.store import aside_path, off_the_event_loop

log = logging.getLogger(__name__)
T = TypeVar("T")


def native_lock() -> Any:
    """A lock that native threads can share: gevent's patched one cannot cross them."""
    monkey = sys.modules.get("gevent.monkey")
    if monkey is not None and monkey.is_module_patched("threading"):
        return monkey.get_original("threading", "Lock")()
    return threading.Lock()


class SQLiteFile:
    """A SQLite database in WAL mode with `synchronous=FULL`: a commit survives power loss.

    Every operation runs through `_run`: in a native thread under gevent (a commit's fsync
    would otherwise stop every request), holding one native lock, in one transaction.
    """

    schema = ""  # the tables and indexes, created when missing
    what = "database"  # what the file is, for the log

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._lock = native_lock()
        self._db = self._open()

    # -- opening ---------------------------------------------------------------------------

    def _open(self) -> sqlite3.Connection:
        try:
            return self._connect()
        except sqlite3.DatabaseError as exc:
            target = aside_path(self.path)
            os.replace(self.path, target)
            log.error("%s %s is corrupt (%s); moved it to %s and started empty", self.what, self.path, exc, target)
            return self._connect()

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=5.0, check_same_thread=False, isolation_level=None)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")  # an acknowledged job survives power loss, not only a crash
            db.executescript(self.schema)
            db.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()  # a corrupt file fails here, not later
        except sqlite3.DatabaseError:
            db.close()
            raise
        return db

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _run(self, func: Callable[..., T], *args: Any) -> T:
        """Run one operation under the store's lock, off gevent's event loop."""
        return off_the_event_loop(self._locked, func, *args)

    def _locked(self, func: Callable[..., T], *args: Any) -> T:
        """`func` in one transaction: all of its changes are committed together, or none."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                result = func(*args)
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
            return result
