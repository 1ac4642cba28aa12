"""Redis mode: the fleet last read from Redis, kept on this host's disk for a process that starts while Redis is down.

A process that is running when Redis goes down routes on the copy it has in memory. One that
starts then (a gunicorn worker replaced, the host rebooted) has none: without this file it would
answer 503 to every request until Redis came back. With it, it routes on the fleet as the host's
processes last saw it; Redis's fleet replaces that, record by record, as soon as it answers.
"""

from __future__ import annotations

import logging
from pathlib import Path

from gateway.fleet.redis_store import Snapshot
from gateway.fleet.store import JsonFileStore, StoreError, off_the_event_loop

log = logging.getLogger(__name__)
SUFFIX = ".redis-copy.json"  # beside BACKEND_SERVERS_FILE: backend_servers.json -> backend_servers.redis-copy.json


def copy_path(backend_servers_file: str) -> Path:
    """Where the copy of Redis's fleet is kept: beside the embedded mode's file, named after it."""
    path = Path(backend_servers_file)
    return path.with_name(path.stem + SUFFIX)


class LocalCopy:
    """The records of the last fleet snapshot read from Redis, written whenever a record changes."""

    def __init__(self, path: Path, where: str) -> None:
        self.path = path
        self._file = JsonFileStore(path)  # written as the server list is: temp file, fsync, rename
        self.where = where  # whose fleet: Redis's address and prefix; a copy of another fleet's is not read
        self._kept: list[tuple[str, int]] | None = None  # the (id, revision) of each record last written
        self._failing = False  # a write failed: said once, until one succeeds
        self._stamp: tuple[int, int] | None = None  # the file's (mtime, size) at its last read

    def keep(self, snapshot: Snapshot) -> None:
        """Write the snapshot's records if any was added, changed or removed since the last write."""
        kept = [(server_id, rev) for server_id, rev, _ in snapshot.records]
        if kept == self._kept:
            return  # only the readings or the sweep moved: the records on disk are these
        head = {"where": self.where, "version": snapshot.version}
        records = [{"server_id": i, "rev": rev, "record": text.decode()} for i, rev, text in snapshot.records]
        try:
            off_the_event_loop(self._file.save, [head, *records])
        except OSError as exc:
            if not self._failing:
                log.warning(
                    "could not keep the fleet's copy in %s (%s): a start without Redis has none", self.path, exc
                )
            self._failing = True
            return
        self._kept, self._failing = kept, False

    def read_if_changed(self) -> Snapshot | None:
        """`read`, unless the file is as it was at the last read: while Redis is down, nobody rewrites it."""
        try:
            stat = self.path.stat()
        except FileNotFoundError:
            return None
        stamp = (stat.st_mtime_ns, stat.st_size)
        if stamp == self._stamp:
            return None
        self._stamp = stamp
        return self.read()

    def read(self) -> Snapshot | None:
        """The copy as a snapshot with no readings, sweep or ejections; None when there is none to read."""
        if not self.path.exists():
            return None
        try:
            head, *body = self._file.load()  # a file that is not a JSON list is moved aside, and reads as []
            records = [(r["server_id"], int(r["rev"]), r["record"].encode()) for r in body]
            version, where = int(head["version"]), head["where"]
        except (StoreError, ValueError, TypeError, KeyError, AttributeError) as exc:
            log.warning("the fleet's copy in %s cannot be read (%s): left unused", self.path, exc)
            return None
        if where != self.where:
            log.warning("the fleet's copy in %s is of %s, not of %s: left unused", self.path, where, self.where)
            return None
        return Snapshot(version, records, {}, {}, {})
