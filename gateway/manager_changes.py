"""BackendManager's changes to the fleet: registrations, removals and the operator's options."""

from __future__ import annotations

import functools
import logging
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from gateway.fleet import records
from gateway.fleet.health import Target
from gateway.fleet.records import Registrant, Registration
from gateway.fleet.registry import Change
from gateway.fleet.server import BackendServer

if TYPE_CHECKING:
    import threading

    from gateway.fleet.registry import Registry
    from gateway.fleet.sweep import HealthJob
    from gateway.manager_cluster import ClusterLink
    from gateway.routing.outliers import OutlierDetector
    from gateway.routing.selection import Selector

log = logging.getLogger("gateway.manager")  # the manager's lines keep the manager's name


class FleetChanges:
    """BackendManager's side that adds, moves, changes and removes servers, each change saved or undone."""

    # Set by BackendManager.__init__: the one lock over the fleet, and the parts a change touches.
    _lock: threading.Lock
    registry: Registry
    selector: Selector
    outliers: OutlierDetector
    health_job: HealthJob
    cluster: ClusterLink
    observers: list[Any]
    check_on_register: bool

    def register_server(
        self,
        server_id: str,
        ip: str,
        port: int,
        monitor_url: str | None = None,
        options: dict[str, Any] | None = None,
    ) -> tuple[BackendServer, bool]:
        """Add a server, or update one's address in place; return it and whether it is new (see `register`).

        The seed's call, as the seed made it: the server waits for the sweep to be checked.
        """
        registration = self.register(server_id, ip, port, monitor_url, options, check=False)
        return registration.server, registration.created

    def register(
        self,
        server_id: str,
        ip: str,
        port: int,
        monitor_url: str | None = None,
        options: dict[str, Any] | None = None,
        registrant: Registrant | None = None,
        check: bool = True,
    ) -> Registration:
        """Add a server, or update one's address in place, if `registrant` may (see `_register`)."""
        return self.cluster.retried(self._register, server_id, ip, port, monitor_url, options, registrant, check)

    def _register(
        self,
        server_id: str,
        ip: str,
        port: int,
        monitor_url: str | None,
        options: dict[str, Any] | None,
        registrant: Registrant | None,
        check: bool,
    ) -> Registration:
        """Add a server, or update one's address in place, if `registrant` may; FleetFull or TokenRefused if not.

        A new address resets the server's health (the seed's IP change). The same address
        again is a heartbeat: health is kept, or an agent re-registering every 30 s would
        hide a dead service from the health checks, and nothing needs writing. With `check`, a
        server that has not passed a check at its address (new, moved) or is unhealthy is
        checked at once, in the background: the call returns first. `options`
        (weight, priority, ...) that are given replace the server's; absent ones are kept, so
        a heartbeat never undoes what an operator set.
        """
        options, registrant = records.checked_options(options or {}), registrant or Registrant()
        place = (ip, port, monitor_url)
        with self._lock:
            existing = self.registry.servers.get(server_id)
            records.admit(existing, registrant, len(self.registry.servers))
            claim = records.claimed(existing, options, registrant)
            if existing is not None and records.address(existing) == place and records.holds(existing, claim.changes):
                server, change = existing, None
                version = self.registry.version
            else:
                server = records.registered(existing, server_id, ip, port, monitor_url, claim.changes)
                change = Change(self._place(server_id, server, existing), server_id, server, existing)
            copied = replace(server)
        if claim.kept_by_operator:
            log.debug("server %s registered; kept %s as the operator set them", server_id, claim.kept_by_operator)
        if change is None:
            self.registry.persist(version)  # a no-op unless an earlier save of this state failed
            log.debug("server %s registered again at %s (unchanged)", server_id, copied.url)
            if check:
                self._check_soon(copied)
            return Registration(copied, False, claim.kept_by_operator, None)
        self._save(change)
        records.log_registration(existing, copied, claim)
        if check:
            self._check_soon(copied)
        return Registration(copied, existing is None, claim.kept_by_operator, claim.server_token)

    def _check_soon(self, server: BackendServer) -> None:
        """Check a registered server now, in the background, unless it has passed a check at its address.

        A new or moved server is checked before the next sweep, so an address that is down leaves
        the rotation within a check's timeout (until then it takes traffic: see records.count_check);
        an unhealthy one that registers again (it restarted) is back as soon as it answers.
        """
        if self.check_on_register and not records.has_passed(server):
            self.health_job.check_soon([Target(server.server_id, server.url)])

    def _place(self, server_id: str, server: BackendServer, existing: BackendServer | None) -> int:
        """Under the lock: put a registration's record in the fleet, in place of `existing`; the new version."""
        if existing is None or records.address(existing) != records.address(server):
            self.selector.came_back(server_id)
        self.registry.servers[server_id] = server  # a known key keeps its place in the order
        if existing is None or existing.monitor_url != server.monitor_url:
            self.registry.readings.forget(server_id)
        return self.registry.changed(server_id)

    def unregister_server(self, server_id: str, registrant: Registrant | None = None) -> bool:
        """Remove a server; False when it was not registered, TokenRefused when `registrant` may not."""
        return self.cluster.retried(self._unregister, server_id, registrant)

    def _unregister(self, server_id: str, registrant: Registrant | None) -> bool:
        check = None if registrant is None else functools.partial(records.check_token, registrant=registrant)
        change = self.registry.remove(server_id, check)
        if change is None:
            return False
        self.outliers.forget(server_id)
        self._save(change)
        for observer in self.observers:
            observer.server_removed(server_id)
        log.info("unregistered server %s", server_id)
        return True

    def update_server(self, server_id: str, changes: dict[str, Any]) -> BackendServer | None:
        """The operator changes a server's routing options (registrations keep them); None when it is unknown."""
        return self._modify(server_id, records.checked_options(changes), by_operator=True)

    def reset_server_token(self, server_id: str) -> BackendServer | None:
        """Unbind a server from its token, so that its next registration binds a new one; None when unknown."""
        return self._modify(server_id, {"token_hash": None}, what="server token reset")

    def set_draining(self, server_id: str, draining: bool) -> BackendServer | None:
        """Drain a server (no new work; its tasks still reach it) or take it back; None when unknown."""
        return self._modify(server_id, {"draining": draining})

    def _modify(
        self, server_id: str, changes: dict[str, Any], by_operator: bool = False, what: str | None = None
    ) -> BackendServer | None:
        return self.cluster.retried(self._modify_once, server_id, changes, by_operator, what)

    def _modify_once(
        self, server_id: str, changes: dict[str, Any], by_operator: bool, what: str | None
    ) -> BackendServer | None:
        modified = self.registry.modify(server_id, changes, by_operator)
        if modified is None:
            return None
        server, change = modified
        if change is not None:
            self._save(change)
            log.info("server %s changed: %s", server_id, what or changes)
        return server

    def _save(self, change: Change) -> None:
        """Save a change or undo it (Registry.persist_or_undo); either way, the health job follows the fleet."""
        try:
            self.registry.persist_or_undo(change)
        finally:
            self.health_job.sync()
