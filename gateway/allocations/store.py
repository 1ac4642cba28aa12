"""Where allocations are kept: the interface both stores offer, and the embedded one, a SQLite file.

Every change checks and writes in one transaction: a key's place and a server's count are read
and changed together, so `max_allocations` holds however many requests place keys at once.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from typing import Any, Protocol

from gateway.allocations.records import (
    ALLOCATION_FIELDS,
    HISTORY_LIMIT,
    RELEASED_HISTORY_SECONDS,
    Allocation,
    Move,
    NoRoom,
)
from gateway.jobs.sqlite import SQLiteFile


class AllocationStore(Protocol):
    """What the allocation service asks of a store: SQLiteAllocationStore, or RedisAllocationStore."""

    def get(self, key: str) -> Allocation | None: ...
    def place(self, allocation: Allocation, capacity: int, entry: Move) -> tuple[Allocation, bool]: ...
    def move(self, key: str, from_id: str, to_id: str, capacity: int, entry: Move) -> Allocation | None: ...
    def release(self, key: str) -> Allocation | None: ...
    def allocations(self, server_id: str | None = None, limit: int = 1000) -> list[Allocation]: ...
    def total(self, server_id: str | None = None) -> int: ...
    def counts(self) -> dict[str, int]: ...
    def group_counts(self, group: str) -> dict[str, int]: ...
    def record(self, entry: Move) -> None: ...
    def history(self, key: str, limit: int = HISTORY_LIMIT) -> list[Move]: ...
    def claim(self, key: str, seconds: float) -> str | None: ...
    def unclaim(self, key: str, token: str) -> None: ...
    def close(self) -> None: ...


def full(server_id: str, capacity: int) -> NoRoom:
    """The refusal of a key for a server at its cap."""
    return NoRoom(f"server {server_id} is at its max_allocations ({capacity})")


class Claims:
    """Keys being moved now, each with a token and an expiry: one move of a key at a time in this process."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._held: dict[str, tuple[str, float]] = {}

    def claim(self, key: str, seconds: float) -> str | None:
        """A token for moving `key`, or None while another move of it holds one."""
        now = time.monotonic()
        with self._lock:
            held = self._held.get(key)
            if held is not None and held[1] > now:
                return None
            token = os.urandom(8).hex()
            self._held[key] = (token, now + seconds)
            return token

    def unclaim(self, key: str, token: str) -> None:
        """Give up the claim `token` holds; another's stays."""
        with self._lock:
            if self._held.get(key, ("",))[0] == token:
                del self._held[key]


class SQLiteAllocationStore(SQLiteFile):
    """Allocations, their history, and released keys' history for a week, in one SQLite file."""

    what = "allocation store"
    schema = """
        CREATE TABLE IF NOT EXISTS allocations (
            key TEXT PRIMARY KEY, server_id TEXT NOT NULL, strategy TEXT NOT NULL, grp TEXT, location TEXT,
            created_at TEXT NOT NULL, updated_at TEXT NOT NULL);
        CREATE INDEX IF NOT EXISTS allocations_server ON allocations (server_id);
        CREATE INDEX IF NOT EXISTS allocations_group ON allocations (grp, server_id);
        CREATE TABLE IF NOT EXISTS allocation_history (
            id INTEGER PRIMARY KEY AUTOINCREMENT, key TEXT NOT NULL, entry TEXT NOT NULL);
        CREATE INDEX IF NOT EXISTS allocation_history_key ON allocation_history (key, id);
        CREATE TABLE IF NOT EXISTS allocation_released (key TEXT PRIMARY KEY, released_at REAL NOT NULL);
    """
    COLUMNS = "key, server_id, strategy, grp, location, created_at, updated_at"

    def __init__(self, path: str | os.PathLike[str]) -> None:
        super().__init__(path)
        self._claims = Claims()

    # -- reading -------------------------------------------------------------------------------

    def get(self, key: str) -> Allocation | None:
        """The key's allocation, or None."""
        return self._run(self._get, key)

    def allocations(self, server_id: str | None = None, limit: int = 1000) -> list[Allocation]:
        """The allocations (of one server), oldest first, at most `limit`."""
        where, args = ("WHERE server_id = ?", (server_id,)) if server_id is not None else ("", ())
        sql = f"SELECT {self.COLUMNS} FROM allocations {where} ORDER BY created_at, key LIMIT ?"
        return [_allocation(row) for row in self._run(self._rows, sql, (*args, limit))]

    def total(self, server_id: str | None = None) -> int:
        """How many keys are allocated (to one server)."""
        if server_id is None:
            return int(self._run(self._rows, "SELECT COUNT(*) FROM allocations", ())[0][0])
        return self._count(server_id)

    def counts(self) -> dict[str, int]:
        """Server id -> keys it holds, for every server holding one."""
        return dict(self._run(self._rows, "SELECT server_id, COUNT(*) FROM allocations GROUP BY server_id", ()))

    def group_counts(self, group: str) -> dict[str, int]:
        """Server id -> keys of `group` it holds."""
        sql = "SELECT server_id, COUNT(*) FROM allocations WHERE grp = ? GROUP BY server_id"
        return dict(self._run(self._rows, sql, (group,)))

    def history(self, key: str, limit: int = HISTORY_LIMIT) -> list[Move]:
        """The key's last `limit` history entries, oldest first."""
        sql = "SELECT entry FROM allocation_history WHERE key = ? ORDER BY id DESC LIMIT ?"
        return [Move.from_dict(json.loads(row[0])) for row in reversed(self._run(self._rows, sql, (key, limit)))]

    def everything(self) -> Iterator[tuple[Allocation, list[Move]]]:
        """Every allocation with its history: what `gpu-gateway migrate --to-redis` copies."""
        for allocation in self.allocations(limit=-1):  # SQLite's LIMIT -1: all of them
            yield allocation, self.history(allocation.key)

    # -- changing ------------------------------------------------------------------------------

    def place(self, allocation: Allocation, capacity: int, entry: Move) -> tuple[Allocation, bool]:
        """Allocate a new key, unless it has an allocation (returned with False); NoRoom at `capacity`."""
        return self._run(self._place, allocation, capacity, entry)

    def move(self, key: str, from_id: str, to_id: str, capacity: int, entry: Move) -> Allocation | None:
        """Move a key still on `from_id` to `to_id`; None when it is gone or elsewhere; NoRoom at `capacity`."""
        return self._run(self._move, key, from_id, to_id, capacity, entry)

    def release(self, key: str) -> Allocation | None:
        """Delete the key's allocation and return it; None when it had none. Its history stays a week."""
        return self._run(self._release, key)

    def record(self, entry: Move) -> None:
        """Add a history entry that changed nothing (a refused move)."""
        self._run(self._record, entry)

    def claim(self, key: str, seconds: float) -> str | None:
        """A token for moving `key` (for at most `seconds`), or None while another move holds it."""
        return self._claims.claim(key, seconds)

    def unclaim(self, key: str, token: str) -> None:
        """End the move that `token` claimed."""
        self._claims.unclaim(key, token)

    # -- in the transaction (under the store's lock) ------------------------------------------

    def _rows(self, sql: str, args: tuple[Any, ...]) -> list[Any]:
        return self._db.execute(sql, args).fetchall()

    def _get(self, key: str) -> Allocation | None:
        row = self._db.execute(f"SELECT {self.COLUMNS} FROM allocations WHERE key = ?", (key,)).fetchone()
        return None if row is None else _allocation(row)

    def _count(self, server_id: str) -> int:
        return int(self._db.execute("SELECT COUNT(*) FROM allocations WHERE server_id = ?", (server_id,)).fetchone()[0])

    def _place(self, allocation: Allocation, capacity: int, entry: Move) -> tuple[Allocation, bool]:
        existing = self._get(allocation.key)
        if existing is not None:
            return existing, False
        if capacity and self._count(allocation.server_id) >= capacity:
            raise full(allocation.server_id, capacity)
        a = allocation
        self._db.execute(
            f"INSERT INTO allocations ({self.COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (a.key, a.server_id, a.strategy, a.group, a.location, a.created_at, a.updated_at),
        )
        self._db.execute("DELETE FROM allocation_released WHERE key = ?", (a.key,))
        self._record(entry)
        return allocation, True

    def _move(self, key: str, from_id: str, to_id: str, capacity: int, entry: Move) -> Allocation | None:
        existing = self._get(key)
        if existing is None or existing.server_id != from_id:
            return None
        if capacity and self._count(to_id) >= capacity:
            raise full(to_id, capacity)
        updated = entry.created_at
        self._db.execute("UPDATE allocations SET server_id = ?, updated_at = ? WHERE key = ?", (to_id, updated, key))
        self._record(entry)
        return Allocation(**{**existing.to_dict(), "server_id": to_id, "updated_at": updated})

    def _release(self, key: str) -> Allocation | None:
        existing = self._get(key)
        if existing is None:
            return None
        now = time.time()
        self._db.execute("DELETE FROM allocations WHERE key = ?", (key,))
        self._db.execute("INSERT OR REPLACE INTO allocation_released VALUES (?, ?)", (key, now))
        # The history of keys released over a week ago goes (each release sweeps, as releases are rare).
        old = "SELECT key FROM allocation_released WHERE released_at < ?"
        self._db.execute(f"DELETE FROM allocation_history WHERE key IN ({old})", (now - RELEASED_HISTORY_SECONDS,))
        self._db.execute("DELETE FROM allocation_released WHERE released_at < ?", (now - RELEASED_HISTORY_SECONDS,))
        return existing

    def _record(self, entry: Move) -> None:
        self._db.execute(
            "INSERT INTO allocation_history (key, entry) VALUES (?, ?)", (entry.key, json.dumps(entry.to_dict()))
        )
        self._db.execute(
            "DELETE FROM allocation_history WHERE key = ? AND id <= ("
            " SELECT id FROM allocation_history WHERE key = ? ORDER BY id DESC LIMIT 1 OFFSET ?)",
            (entry.key, entry.key, HISTORY_LIMIT),
        )


def _allocation(row: sqlite3.Row | tuple[Any, ...]) -> Allocation:
    return Allocation(**dict(zip(ALLOCATION_FIELDS, row, strict=True)))
