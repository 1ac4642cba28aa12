"""Which server owns which task, kept in SQLite so it survives a restart or a crash."""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
from pathlib import Path
from typing import Protocol

from gateway.fleet.store import aside_path

log = logging.getLogger(__name__)

FALLBACK_OWNER = "~fallback"  # tasks created by BACKEND_API_BASE; not a valid server_id
MAX_TASK_ID_LENGTH = 128


class TaskOwners(Protocol):
    """What the proxy and the jobs ask of a task-affinity store: TaskAffinity, or RedisTaskAffinity."""

    def record(self, task_id: str, server_id: str) -> bool: ...
    def owner(self, task_id: str) -> str | None: ...
    def first_owned(self, candidates: list[str]) -> tuple[str, str] | None: ...
    def purge_expired(self) -> int: ...
    def close(self) -> None: ...


class TaskAffinity:
    """Records task owners with an expiry; every record is committed before it is used."""

    def __init__(self, path: str | os.PathLike[str], ttl: float = 86400.0) -> None:
        self.path = Path(path)
        self.ttl = ttl
        self._lock = threading.Lock()
        self._db = self._open()
        self._known: set[str] = set()  # every live task id, so most requests skip the query
        self._next_purge = 0.0
        self.purge_expired()

    def _open(self) -> sqlite3.Connection:
        try:
            return self._connect()
        except sqlite3.DatabaseError as exc:
            target = aside_path(self.path)
            os.replace(self.path, target)
            log.error("task affinity store %s is corrupt (%s); moved it to %s", self.path, exc, target)
            return self._connect()

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=2.0, check_same_thread=False, isolation_level=None)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            # NORMAL in WAL mode: a commit survives the process being killed (what a gateway
            # restart needs) without an fsync on the request path; power loss may drop the last few.
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute(
                "CREATE TABLE IF NOT EXISTS task_owner ("
                " task_id TEXT PRIMARY KEY, server_id TEXT NOT NULL, expires_at REAL NOT NULL)"
            )
        except sqlite3.DatabaseError:
            db.close()
            raise
        return db

    def record(self, task_id: str, server_id: str) -> bool:
        """Remember that `server_id` owns `task_id`; False if another server owns it already."""
        if len(task_id) > MAX_TASK_ID_LENGTH:
            return False
        now = time.time()
        if now >= self._next_purge:
            self.purge_expired()
        with self._lock:
            cursor = self._db.execute(
                "INSERT INTO task_owner VALUES (?, ?, ?) ON CONFLICT(task_id) DO UPDATE"
                " SET server_id = excluded.server_id, expires_at = excluded.expires_at"
                " WHERE task_owner.expires_at <= ? OR task_owner.server_id = excluded.server_id",
                (task_id, server_id, now + self.ttl, now),
            )
            if cursor.rowcount == 1:
                self._known.add(task_id)
            return cursor.rowcount == 1

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
        names = [c for c in candidates if c in self._known]
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

    def live(self) -> list[tuple[str, str, float]]:
        """Every task owner not yet expired: (task id, server id, seconds left), for a move to Redis."""
        now = time.time()
        with self._lock:
            rows = self._db.execute(
                "SELECT task_id, server_id, expires_at FROM task_owner WHERE expires_at > ?", (now,)
            ).fetchall()
        return [(task_id, server_id, expires_at - now) for task_id, server_id, expires_at in rows]

    def purge_expired(self) -> int:
        """Delete expired records; return how many went. Runs at start and then hourly."""
        self._next_purge = time.time() + 3600
        with self._lock:
            purged = self._db.execute("DELETE FROM task_owner WHERE expires_at <= ?", (time.time(),)).rowcount
            self._known = {row[0] for row in self._db.execute("SELECT task_id FROM task_owner")}
            return purged

    def close(self) -> None:
        """Close the database."""
        with self._lock:
            self._db.close()
