"""The registered servers and what is known of them, and their saves: every change durable, or undone."""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable
from dataclasses import replace
from typing import Any, NamedTuple

from gateway.cluster.connection import RedisUnavailable
from gateway.fleet.health import Target
from gateway.fleet.model_discovery import DiscoveryTarget
from gateway.fleet.model_memory import still_loaded
from gateway.fleet.monitor_reader import MonitorTarget
from gateway.fleet.readings import Readings
from gateway.fleet.records import declares, held_by_operator, holds
from gateway.fleet.redis_store import Conflict, Fenced, RedisFleetStore, Snapshot
from gateway.fleet.resources import Reading
from gateway.fleet.server import BackendServer, now_iso
from gateway.fleet.store import JsonFileStore, off_the_event_loop
from gateway.fleet.sweep import SweepTargets

log = logging.getLogger(__name__)


class PersistError(RuntimeError):
    """A change was made in memory but could not be saved."""


class StaleCopy(PersistError):
    """Redis holds a newer record than the one this process changed; catch up and make the change again."""


class Change(NamedTuple):
    """A change made in memory: its version, and what to put back at `server_id` if it cannot be saved."""

    version: int
    server_id: str
    placed: BackendServer | None  # the record the change put there; None when it removed one
    previous: BackendServer | None  # the record before; None when the change added it
    order: list[str] | None = None  # the registration order before, when the change removed a server


class Registry:
    """The servers in registration order, their monitors' readings, and their saves to the store.

    It shares the fleet's lock (BackendManager's): its methods take it, except those marked
    "under the lock". `on_change` runs under it after every change.
    """

    def __init__(self, lock: threading.Lock, on_change: Callable[[], None]) -> None:
        self._lock = lock
        self._on_change = on_change
        self.servers: dict[str, BackendServer] = {}  # insertion order is registration order
        self.readings = Readings()
        self.store: JsonFileStore | RedisFleetStore | None = None
        self.version = 0
        self._save_lock = threading.Lock()
        self._saved_version = 0
        # Redis mode, under the lock: each record's revision there, the records changed here and not
        # yet written (a snapshot never replaces those: the write, compared and set, decides), and
        # the newest version this process wrote or adopted (an older snapshot is not adopted).
        self._revs: dict[str, int] = {}
        self._unsaved: dict[str, int] = {}  # server id -> the version of its last change not yet written
        self._shared_version = 0
        self.shared_sweep: dict[str, Any] = {}  # the leader's last sweep, as Redis has it

    def changed(self, *server_ids: str) -> int:
        """Under the lock: note a change (to these servers' records), let the owner catch up; the new version."""
        self._on_change()
        self.version += 1
        if server_ids and isinstance(self.store, RedisFleetStore):  # the JSON file is written whole
            for server_id in server_ids:
                self._unsaved[server_id] = self.version
        return self.version

    def sweep_targets(self) -> SweepTargets:
        """What the next sweep asks: every server's health, its monitor, and the models of those that list none."""
        with self._lock:
            servers = self.servers.values()
            return SweepTargets(
                [Target(s.server_id, s.url) for s in servers],
                [MonitorTarget(s.server_id, s.monitor_url) for s in servers if s.monitor_url],
                [DiscoveryTarget(s.server_id, s.url) for s in servers if not declares(s)],
                [DiscoveryTarget(s.server_id, s.url) for s in servers if declares(s) or s.discovered_models],
            )

    def monitor_targets(self) -> list[MonitorTarget]:
        """Every server's monitor, to be read now (POST /admin/resource-cache/clear)."""
        with self._lock:
            return [MonitorTarget(s.server_id, s.monitor_url) for s in self.servers.values() if s.monitor_url]

    def keep_readings(self, readings: list[tuple[str, str, Reading]]) -> None:
        """Keep each (server_id, monitor_url, reading) whose server still has that monitor."""
        with self._lock:
            for server_id, monitor_url, reading in readings:
                server = self.servers.get(server_id)
                if server is not None and server.monitor_url == monitor_url:
                    self.readings.keep(server_id, reading)

    def discover(self, found: list[tuple[str, str, list[str]]]) -> tuple[list[str], int]:
        """Keep each (server_id, url, models) whose server is still at that url and lists none of its own.

        Returns the ids whose models changed, and the version that holds them.
        """
        with self._lock:
            changed = []
            for server_id, url, models in found:
                server = self.servers.get(server_id)
                if (
                    server is not None
                    and server.url == url
                    and not declares(server)
                    and server.discovered_models != models
                ):
                    server.discovered_models = list(models)
                    changed.append(server_id)
            return changed, self.changed(*changed) if changed else self.version

    def keep_loaded(self, found: list[tuple[str, str, list[tuple[str, int]] | None]]) -> tuple[list[str], int]:
        """Keep what each (server_id, url, loaded) has in memory, if still at that url; None: unknown, so none.

        A model read again at the same size keeps its entry and time, so an unchanged list writes
        nothing. Returns the ids whose loaded models changed, and the version that holds them.
        """
        now = now_iso()
        with self._lock:
            changed = []
            for server_id, url, read in found:
                server = self.servers.get(server_id)
                if server is None or server.url != url:
                    continue
                loaded = still_loaded(server.loaded_models, read or [], now)
                if loaded != server.loaded_models:
                    server.loaded_models = loaded
                    changed.append(server_id)
            return changed, self.changed(*changed) if changed else self.version

    def modify(
        self, server_id: str, changes: dict[str, Any], by_operator: bool = False
    ) -> tuple[BackendServer, Change | None] | None:
        """Change a server's record: a copy of it, and the change (None when nothing changed); None when unknown.

        Options changed `by_operator` are the operator's from then on: registrations keep them.
        """
        with self._lock:
            existing = self.servers.get(server_id)
            if existing is None:
                return None
            if by_operator:
                changes = {**changes, "operator_options": held_by_operator(existing, changes)}
            if holds(existing, changes):
                return replace(existing), None  # nothing changes: nothing to write
            server = replace(existing, **changes)
            self.servers[server_id] = server
            return replace(server), Change(self.changed(server_id), server_id, server, existing)

    def remove(self, server_id: str, check: Callable[[BackendServer], None] | None = None) -> Change | None:
        """Take a server and its reading out; None when it was not registered.

        `check` sees the record under the lock first, and may raise to leave it in place.
        """
        with self._lock:
            if check is not None and server_id in self.servers:
                check(self.servers[server_id])
            order = list(self.servers)
            removed = self.servers.pop(server_id, None)
            if removed is None:
                return None
            self.readings.forget(server_id)
            return Change(self.changed(server_id), server_id, None, removed, order)

    def load(self) -> None:
        """Replace the servers with the store's, health state and all; bad entries are set aside."""
        if self.store is None:
            return
        if isinstance(self.store, RedisFleetStore):
            self.adopt(self.store.snapshot())
            log.info("loaded %d servers from %s", len(self.servers), self.store.where)
            return
        servers, bad = {}, []
        for entry in self.store.load():
            try:
                server = BackendServer.from_dict(entry)
            except ValueError as exc:
                bad.append(str(exc))
                continue
            servers[server.server_id] = server
        if bad:
            self.store.keep_copy(f"{len(bad)} bad entries, first: {bad[0]}")
        with self._lock:
            self.servers = servers
            self._saved_version = self.changed()
        log.info("loaded %d servers from %s", len(servers), self.store.path)

    def persist(self, version: int, fence: str = "") -> None:
        """Save a state at least as new as `version`; writers that queue up share one save.

        In Redis, `fence` (the leader's token) makes the writes the leader's: refused once another leads.
        """
        if self.store is None:
            return
        if isinstance(self.store, RedisFleetStore):
            self._persist_shared(self.store, version, fence)
            return
        with self._save_lock:
            if self._saved_version >= version:
                return  # a save that began after our change already wrote it
            with self._lock:
                entries = [server.to_entry() for server in self.servers.values()]
                snapshot_version = self.version
            try:
                off_the_event_loop(self.store.save, entries)
            except OSError as exc:
                log.error("could not save %s: %s", self.store.path, exc)
                raise PersistError(f"could not save the server list: {exc.strerror or exc}") from exc
            self._saved_version = snapshot_version

    def try_persist(self, version: int, fence: str = "") -> None:
        """Save if possible; a failure is logged, and the next save carries the change."""
        with contextlib.suppress(PersistError, RedisUnavailable):
            self.persist(version, fence)

    def persist_or_undo(self, change: Change) -> None:
        """Save a change; if that fails, undo it in memory too, so a retry starts afresh."""
        try:
            self.persist(change.version)
        except (PersistError, RedisUnavailable):
            with self._lock:
                if self._saved_version >= change.version:
                    return  # another writer's later save already made this change durable
                if self.servers.get(change.server_id) is change.placed:  # untouched since: safe to undo
                    self._restore(change)
                    self.changed()
                    self._unsaved.pop(change.server_id, None)  # back as Redis has it: nothing to write
            raise

    def _restore(self, change: Change) -> None:
        """Put back the record before `change` (at its old place), or remove it; under the lock."""
        server_id, previous, order = change.server_id, change.previous, change.order
        if previous is None:
            self.servers.pop(server_id, None)
            return
        self.servers[server_id] = previous
        if order is not None:  # servers registered meanwhile keep their places after the old ones
            old = [key for key in order if key in self.servers]
            self.servers = {key: self.servers[key] for key in old + [k for k in self.servers if k not in order]}

    # -- Redis mode -------------------------------------------------------------------------

    def _persist_shared(self, store: RedisFleetStore, version: int, fence: str) -> None:
        """Write each record changed here since its last write, compared and set; remove those that went.

        Raises StaleCopy, after writing the others and catching up, when another process had
        changed a record first: the change made here is dropped, and its caller may make it again.
        """
        with self._save_lock:
            if self._saved_version >= version:
                return
            with self._lock:
                snapshot_version = self.version
                writes = [
                    (server_id, changed_at, server.to_entry() if server else None, self._revs.get(server_id, 0))
                    for server_id, changed_at in self._unsaved.items()
                    if (server := self.servers.get(server_id)) is not None or server_id in self._revs
                ]
            stale = []
            for server_id, changed_at, entry, rev in writes:
                try:
                    new_rev = store.put(server_id, entry, rev, fence)
                except Conflict:
                    stale.append(server_id)
                    new_rev = None
                except Fenced:
                    log.info("not writing the sweep's results: another gateway leads now")
                    raise PersistError("another gateway leads the health sweep now") from None
                with self._lock:
                    if self._unsaved.get(server_id) == changed_at:  # not changed again meanwhile
                        del self._unsaved[server_id]
                    if new_rev is None:
                        continue
                    self._shared_version = max(self._shared_version, new_rev)
                    if entry is None:
                        self._revs.pop(server_id, None)
                    else:
                        self._revs[server_id] = new_rev
            if stale:
                self.adopt(store.snapshot())  # take the newer records in place of the ones changed here
                raise StaleCopy(f"another gateway changed {', '.join(stale)} first")
            self._saved_version = snapshot_version

    def adopt(self, snapshot: Snapshot) -> bool:
        """Take Redis's fleet as this process's copy, except the records changed here and not yet written.

        Records whose revision this process has already stay as they are, with what only it
        knows (fail counts on their way to the threshold, when each last took a request). False
        when the snapshot is older than a write this process made: a later one carries that.
        """
        store = self.store
        assert isinstance(store, RedisFleetStore)
        with self._lock:
            if snapshot.version < self._shared_version:
                return False
            servers: dict[str, BackendServer] = {}
            for server_id, rev, text in snapshot.records:
                current = self.servers.get(server_id)
                if server_id in self._unsaved or (current is not None and self._revs.get(server_id) == rev):
                    if current is not None:  # absent: removed here, the removal not yet written
                        servers[server_id] = current
                    continue
                entry = store.entry(server_id, text)
                try:
                    server = BackendServer.from_dict(entry)
                except ValueError as exc:
                    log.error("a fleet record in %s is not valid; left out: %s", store.where, exc)
                    continue
                if current is not None:
                    server.last_used_time = current.last_used_time
                servers[server_id] = server
                self._revs[server_id] = rev
            for server_id, server in self.servers.items():  # added here, not yet written
                if server_id in self._unsaved and server_id not in servers:
                    servers[server_id] = server
            for server_id in [i for i in self._revs if i not in servers and i not in self._unsaved]:
                del self._revs[server_id]
            for server_id, reading in snapshot.readings.items():
                if server_id in servers:
                    self.readings.keep_newer(server_id, reading)
            for server_id in self.readings.server_ids() - servers.keys():
                self.readings.forget(server_id)
            self._shared_version = snapshot.version
            self.shared_sweep = snapshot.sweep
            if list(servers) == list(self.servers) and all(servers[i] is self.servers[i] for i in servers):
                return True  # nothing of the fleet changed (the readings may have): routing stays as it is
            self.servers = servers
            self.changed()
        return True

    def adopt_copy(self, snapshot: Snapshot) -> None:
        """Take the host's copy of Redis's fleet, Redis being down: once it answers, its fleet replaces all of it."""
        self.adopt(snapshot)
        with self._lock:
            self._shared_version = 0  # any version Redis has is adopted, even one older than the copy's
            self._revs.clear()  # and every record of it is read again, none kept as the copy had it

    @property
    def shared_version(self) -> int:
        """The newest fleet version this process wrote to Redis or adopted from it."""
        return self._shared_version

    def share_readings(self, sweep: dict[str, Any], fence: str) -> None:
        """As the leader: put this process's fresh readings and the sweep's time where every process reads them."""
        store = self.store
        if not isinstance(store, RedisFleetStore):
            return
        with self._lock:
            readings = self.readings.latest()
        with contextlib.suppress(RedisUnavailable):
            store.put_readings(readings, sweep, fence)
