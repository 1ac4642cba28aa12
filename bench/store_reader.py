"""The gateway's job store, read from outside (read-only) while the gateway runs: counts, times, sizes."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any


class StoreReader:
    """Reads the SQLite file of a running gateway's job store; WAL mode lets it read beside the writer."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def _query(self, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        db = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=5.0)
        try:
            return db.execute(sql, args).fetchall()
        finally:
            db.close()

    def counts(self) -> dict[str, int]:
        """Jobs per status."""
        return {status: count for status, count in self._query("SELECT status, COUNT(*) FROM jobs GROUP BY status")}

    def span(self, since: float) -> dict[str, Any]:
        """Of the jobs started at or after `since` (Unix time): the first start, the last finish, the outcomes."""
        ((first, last, succeeded, failed),) = self._query(
            "SELECT MIN(started_at), MAX(finished_at), COALESCE(SUM(status = 'succeeded'), 0),"
            " COALESCE(SUM(status = 'failed'), 0) FROM jobs WHERE started_at >= ?",
            (since,),
        )
        return {"first_started": first, "last_finished": last, "succeeded": succeeded, "failed": failed}

    def sizes(self) -> dict[str, int]:
        """The database's size in pages (what a reader sees, the WAL included) and its files on disk, in bytes."""
        ((pages,),) = self._query("PRAGMA page_count")
        ((page_size,),) = self._query("PRAGMA page_size")
        files = sum(path.stat().st_size for path in (self.path, self.path.with_name(self.path.name + "-wal"))
                    if path.exists())  # fmt: skip
        return {"database": pages * page_size, "files": files}
