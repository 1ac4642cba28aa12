"""What a request asks of the fleet, the slot it holds while in flight, the queue it waits in, and why it got none."""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Collection
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

    __slots__ = ("_owner", "actual_model", "released", "server")

    def __init__(self, owner: LeaseOwner | None, server: BackendServer | None, actual_model: str | None) -> None:
        self._owner = owner
        self.server = server  # a copy; None for the fallback backend, which takes no slots
        self.actual_model = actual_model  # the server's own name for the requested model
        self.released = False

    def release(self) -> None:
        """Free the slot; calling it again does nothing."""
        if self._owner is not None:
            self._owner.release_lease(self)


class LeaseOwner:
    """What hands out leases (Admission)."""

    def release_lease(self, lease: Lease) -> None:
        raise NotImplementedError


class Waiter:
    """A request waiting in the queue for a slot; Admission hands it a lease or an error."""

    __slots__ = ("error", "event", "exclude", "lease", "route")

    def __init__(self, route: RouteRequest, exclude: Collection[str]) -> None:
        self.route = route
        self.exclude = exclude
        self.event = threading.Event()
        self.lease: Lease | None = None
        self.error: NoServer | None = None


# Under the fleet's lock: the chosen server (a copy, stamped as used) and its name for the model.
Choose = Callable[[RouteRequest, Collection[str]], tuple[BackendServer, str | None]]


class Admission(LeaseOwner):
    """The slots each server has in flight, and the requests queued for one, first come first served.

    It shares the fleet's lock (BackendManager's), and `choose` runs under it.
    """

    def __init__(self, lock: threading.Lock, choose: Choose) -> None:
        self._lock = lock
        self._choose = choose
        self.in_flight: dict[str, int] = {}  # leases held per server id; an entry goes at zero
        self.waiters: deque[Waiter] = deque()

    def acquire(self, route: RouteRequest, exclude: Collection[str], timeout: float, queue_max_size: int) -> Lease:
        """A slot on the server chosen for `route`; waits up to `timeout` while all are at their cap."""
        with self._lock:
            try:
                return self._lease(route, exclude)
            except NoServer as exc:
                if exc.code != "at_capacity":
                    raise
                if timeout <= 0 or len(self.waiters) >= queue_max_size:
                    reason = "and the queue is full" if timeout > 0 else "and queueing is off"
                    raise NoServer(503, "queue_full", f"{exc.message}, {reason}", retry_after="1") from None
                waiter = Waiter(route, exclude)
                self.waiters.append(waiter)
        waiter.event.wait(timeout)
        with self._lock:
            if waiter.lease is not None:
                return waiter.lease
            if waiter.error is not None:
                raise waiter.error
            self.waiters.remove(waiter)
        message = f"every server that can take this request stayed at its max_concurrent for {timeout:g}s"
        raise NoServer(503, "queue_timeout", message, retry_after="1")

    def hold(self, server: BackendServer) -> Lease:
        """Under the lock: a slot on `server` (a copy), cap or not."""
        self.in_flight[server.server_id] = self.in_flight.get(server.server_id, 0) + 1
        return Lease(self, server, None)

    def release_lease(self, lease: Lease) -> None:
        """Free a lease's slot once, and hand it to the first queued request that can use it."""
        with self._lock:
            if lease.released or lease.server is None:
                return
            lease.released = True
            server_id = lease.server.server_id
            count = self.in_flight.get(server_id, 0) - 1
            if count > 0:
                self.in_flight[server_id] = count
            else:
                self.in_flight.pop(server_id, None)
            self.dispatch_waiters()

    def dispatch_waiters(self) -> None:
        """Under the lock: give queued requests, oldest first, the slots that are free now."""
        for waiter in list(self.waiters):
            try:
                waiter.lease = self._lease(waiter.route, waiter.exclude)
            except NoServer as exc:
                if exc.code == "at_capacity":
                    continue
                waiter.error = exc
            self.waiters.remove(waiter)
            waiter.event.set()

    def _lease(self, route: RouteRequest, exclude: Collection[str]) -> Lease:
        """Under the lock: choose and take a slot."""
        server, actual_model = self._choose(route, exclude)
        self.in_flight[server.server_id] = self.in_flight.get(server.server_id, 0) + 1
        return Lease(self, server, actual_model)
