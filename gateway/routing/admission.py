"""What a request asks of the fleet, the slot it holds while in flight, and why it got none."""

from __future__ import annotations

import threading
from collections.abc import Collection
from dataclasses import dataclass

from gateway.fleet.server import BackendServer


@dataclass(frozen=True)
class RouteRequest:
    """What a request needs from a server."""

    model: str | None = None  # the model it names, as the client spelled it
    session_key: str | None = None  # requests with one key go to one server while it can take them
    required_bytes: int | None = None  # GPU memory the request needs free

    @property
    def plain(self) -> bool:
        """True when any healthy server will do."""
        return self.model is None and self.session_key is None and self.required_bytes is None


class NoServer(Exception):
    """No server can take the request; `status` and `code` say why, for the client."""

    def __init__(
        self, status: int, code: str, message: str, fallback_ok: bool = False, retry_after: str | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        # model_not_found, model_unavailable, no_server, no_fit, at_capacity, queue_full or queue_timeout
        self.code = code
        self.message = message
        self.fallback_ok = fallback_ok  # the fallback backend (BACKEND_API_BASE) may take it instead
        self.retry_after = retry_after


class Lease:
    """One request's slot on a server, from the routing decision until its response closes."""

    __slots__ = ("_manager", "actual_model", "released", "server")

    def __init__(self, manager: LeaseOwner | None, server: BackendServer | None, actual_model: str | None) -> None:
        self._manager = manager
        self.server = server  # a copy; None for the fallback backend, which takes no slots
        self.actual_model = actual_model  # the server's own name for the requested model
        self.released = False

    def release(self) -> None:
        """Free the slot; calling it again does nothing."""
        if self._manager is not None:
            self._manager.release_lease(self)


class LeaseOwner:
    """What hands out leases (the BackendManager)."""

    def release_lease(self, lease: Lease) -> None:
        raise NotImplementedError


class Waiter:
    """A request waiting in the queue for a slot; the manager hands it a lease or an error."""

    __slots__ = ("error", "event", "exclude", "lease", "route")

    def __init__(self, route: RouteRequest, exclude: Collection[str]) -> None:
        self.route = route
        self.exclude = exclude
        self.event = threading.Event()
        self.lease: Lease | None = None
        self.error: NoServer | None = None
