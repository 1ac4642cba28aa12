"""The registered servers and what is known of them, and their saves: every change durable, or undone."""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable
from dataclasses import replace
from typing import Any, NamedTuple

from gateway.fleet.health import Target
from gateway.fleet.model_discovery import DiscoveryTarget
from gateway.fleet.monitor_reader import MonitorTarget
from gateway.fleet.readings import Readings
from gateway.fleet.records import declares, held_by_operator, holds
from gateway.fleet.resources import Reading
from gateway.fleet.server import BackendServer
from gateway.fleet.store import JsonFileStore, off_the_event_loop
from gateway.fleet.sweep import SweepTargets

log = logging.getLogger(__name__)


class PersistError(RuntimeError):
    """A change was made in memory but could not be saved."""


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
        self.store: JsonFileStore | None = None
        self.version = 0
        self._save_lock = threading.Lock()
        self._saved_version = 0

    def changed(self) -> int:
        """Under the lock: note a change, let the owner catch up, and return the new version."""
        self._on_change()
        self.version += 1
        return self.version

    def sweep_targets(self) -> SweepTargets:
        """What the next sweep asks: every server's health, its monitor, and the models of those that list none."""
        with self._lock:
            servers = self.servers.values()
            return SweepTargets(
                [Target(s.server_id, s.url) for s in servers],
                [MonitorTarget(s.server_id, s.monitor_url) for s in servers if s.monitor_url],
                [DiscoveryTarget(s.server_id, s.url) for s in servers if not declares(s)],
            )

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
            return changed, self.changed() if changed else self.version

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
            return replace(server), Change(self.changed(), server_id, server, existing)

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
            return Change(self.changed(), server_id, None, removed, order)

    def load(self) -> None:
        """Replace the servers with the store's, health state and all; bad entries are set aside."""
        if self.store is None:
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

    def persist(self, version: int) -> None:
        """Save a state at least as new as `version`; writers that queue up share one save."""
        if self.store is None:
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

    def try_persist(self, version: int) -> None:
        """Save if possible; a failure is logged, and the next save carries the change."""
        with contextlib.suppress(PersistError):
            self.persist(version)

    def persist_or_undo(self, change: Change) -> None:
        """Save a change; if that fails, undo it in memory too, so a retry starts afresh."""
        try:
            self.persist(change.version)
        except PersistError:
            with self._lock:
                if self._saved_version >= change.version:
                    return  # another writer's later save already made this change durable
                if self.servers.get(change.server_id) is change.placed:  # untouched since: safe to undo
                    self._restore(change)
                    self.changed()
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
