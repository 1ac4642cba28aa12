"""Which server owns which task, kept in SQLite so it survives a restart or a crash."""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
from pathlib import Path

log = logging.getLogger(__name__)

FALLBACK_OWNER = "~fallback"  # tasks created by BACKEND_API_BASE; not a valid server_id
MAX_TASK_ID_LENGTH = 128


class TaskAffinity:
    """Records task owners with an expiry; every record is committed before it is used."""

    def __init__(self, path: str | os.PathLike[str], ttl: float = 86400.0) -> None:
        self.path = Path(path)
        self.ttl = ttl
        self._lock = threading.Lock()
        self._db = self._open()
        self.purge_expired()

    def _open(self) -> sqlite3.Connection:
        try:
            return self._connect()
        except sqlite3.DatabaseError as exc:
            target = self.path.with_name(f"{self.path.name}.corrupt-{time.strftime('%Y%m%dT%H%M%S')}")
            os.replace(self.path, target)
            log.error("task affinity store %s is corrupt (%s); moved it to %s", self.path, exc, target)
            return self._connect()

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            db.execute(
                "CREATE TABLE IF NOT EXISTS task_owner ("
                " task_id TEXT PRIMARY KEY, server_id TEXT NOT NULL, expires_at REAL NOT NULL)"
            )
        except sqlite3.DatabaseError:
            db.close()
            raise
        return db

    def record(self, task_id: str, server_id: str) -> None:
        """Remember that `server_id` owns `task_id`."""
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO task_owner VALUES (?, ?, ?)", (task_id, server_id, time.time() + self.ttl)
            )

    def owner(self, task_id: str) -> str | None:
        """The server that owns `task_id`, or None if unknown or expired."""
        if len(task_id) > MAX_TASK_ID_LENGTH:
            return None
        with self._lock:
            row = self._db.execute(
                "SELECT server_id FROM task_owner WHERE task_id = ? AND expires_at > ?", (task_id, time.time())
            ).fetchone()
        return row[0] if row else None

    def first_owned(self, candidates: list[str]) -> tuple[str, str] | None:
        """The first candidate that is a known task, with its owner, in one query."""
        names = [c for c in candidates if c and len(c) <= MAX_TASK_ID_LENGTH]
        if not names:
            return None
        marks = ",".join("?" * len(names))
        with self._lock:
            rows = self._db.execute(
                f"SELECT task_id, server_id FROM task_owner WHERE task_id IN ({marks}) AND expires_at > ?",
                (*names, time.time()),
            ).fetchall()
        owners = dict(rows)
        for name in names:
            if name in owners:
                return name, owners[name]
        return None

    def purge_expired(self) -> int:
        """Delete expired records; return how many went."""
        with self._lock:
            return self._db.execute("DELETE FROM task_owner WHERE expires_at <= ?", (time.time(),)).rowcount

    def close(self) -> None:
        """Close the database."""
        with self._lock:
            self._db.close()
