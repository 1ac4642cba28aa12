"""What a request asks of the fleet, the slot it holds while in flight, the queue it waits in, and why it got none."""

from __future__ import annotations

import logging
import random
import threading
import time
from collections import deque
from collections.abc import Callable, Collection
from dataclasses import dataclass

from gateway.cluster.connection import RedisUnavailable
from gateway.cluster.slots import SharedSlots
from gateway.fleet.server import BackendServer

log = logging.getLogger(__name__)

# Seconds between a queued request's looks at the shared slots (REDIS_URL): a slot freed by another
# process wakes nobody here. Drawn from this range, so that the waiters of many processes spread out.
RECHECK_SECONDS = (0.05, 0.1)
AT_CAPACITY = "every server that can take this request is at its max_concurrent"


@dataclass(frozen=True)
class RouteRequest:
    """What a request needs from a server."""

    model: str | None = None  # the model it names, as the client spelled it
    session_key: str | None = None  # requests with one key go to one server while it can take them
    required_bytes: int | None = None  # GPU memory the request needs free
    prefix: tuple[int, ...] = ()  # ROUTING_POLICY=prefix: its prompt's chained block hashes (routing/prefix.py)

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

    __slots__ = ("_owner", "actual_model", "released", "server", "shared_id")

    def __init__(self, owner: LeaseOwner | None, server: BackendServer | None, actual_model: str | None) -> None:
        self._owner = owner
        self.server = server  # a copy; None for the fallback backend, which takes no slots
        self.actual_model = actual_model  # the server's own name for the requested model
        self.released = False
        self.shared_id: str | None = None  # its lease in Redis (SharedSlots), for a capped server

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

    It shares the fleet's lock (BackendManager's), and `choose` runs under it. With `shared_slots`
    (REDIS_URL), a server's max_concurrent holds across every gateway process: a lease on a capped
    server also takes a slot in Redis, outside the lock, and one the cluster refuses is given back
    and another server chosen. Servers without a cap never touch Redis.
    """

    def __init__(self, lock: threading.Lock, choose: Choose) -> None:
        self._lock = lock
        self._choose = choose
        self.in_flight: dict[str, int] = {}  # leases held per server id, in this process; an entry goes at zero
        self.waiters: deque[Waiter] = deque()
        self.shared_slots: SharedSlots | None = None
        self._caps_local = False  # Redis did not answer the last take: each process enforces the caps alone

    def acquire(self, route: RouteRequest, exclude: Collection[str], timeout: float, queue_max_size: int) -> Lease:
        """A slot on the server chosen for `route`; waits up to `timeout` while all are at their cap."""
        with self._lock:  # the hot path: a free slot, taken in one hold of the lock
            try:
                lease: Lease | None = self._lease(route, exclude)
            except NoServer as exc:
                if exc.code != "at_capacity":
                    raise
                lease = None
        if lease is not None and (self.shared_slots is None or self.take_shared(lease, enforce_cap=True)):
            return lease
        refused = set() if lease is None or lease.server is None else {lease.server.server_id}
        return self._acquire_queued(route, exclude, refused, time.monotonic() + timeout, timeout, queue_max_size)

    def _acquire_queued(
        self,
        route: RouteRequest,
        exclude: Collection[str],
        refused: set[str],
        deadline: float,
        timeout: float,
        queue_max_size: int,
    ) -> Lease:
        """Every server for `route` was at its cap, here or across the cluster: try again, else wait in the queue."""
        waiter: Waiter | None = None
        while True:
            got = self._lease_or_queue(route, exclude, refused, waiter, timeout, queue_max_size)
            if isinstance(got, Waiter):
                waiter, refused = got, set()  # after a wait, a server refused before may have room
                got = self._wait(waiter, deadline, timeout)
            if self.take_shared(got, enforce_cap=True):
                return got
            assert got.server is not None
            refused.add(got.server.server_id)  # the cluster is full there: choose again without it

    def _lease_or_queue(
        self,
        route: RouteRequest,
        exclude: Collection[str],
        refused: set[str],
        waiter: Waiter | None,
        timeout: float,
        queue_max_size: int,
    ) -> Lease | Waiter:
        """A lease, or the request queued (in one hold of the lock, so that no release is missed)."""
        with self._lock:
            try:
                return self._lease(route, exclude if not refused else {*exclude, *refused})
            except NoServer as exc:
                # With servers refused by the cluster set aside, whatever is left over is no reason:
                # those servers fit and are full, as an at_capacity one is.
                if exc.code != "at_capacity" and not refused:
                    raise
                message = exc.message if exc.code == "at_capacity" else AT_CAPACITY
            if waiter is not None:  # refused after its wait: back to the head of the queue, where it was
                self.waiters.appendleft(waiter)
                return waiter
            if timeout <= 0 or len(self.waiters) >= queue_max_size:
                reason = "and the queue is full" if timeout > 0 else "and queueing is off"
                raise NoServer(503, "queue_full", f"{message}, {reason}", retry_after="1")
            waiter = Waiter(route, exclude)
            self.waiters.append(waiter)
            return waiter

    def _wait(self, waiter: Waiter, deadline: float, timeout: float) -> Lease:
        """Wait in the queue for a lease until `deadline`; with shared slots, look again now and then too."""
        recheck = self.shared_slots is not None
        while True:
            left = deadline - time.monotonic()
            if left > 0:
                pause = random.uniform(*RECHECK_SECONDS)  # noqa: S311  (a spread, not a secret)
                waiter.event.wait(min(left, pause) if recheck else left)
            with self._lock:
                if waiter.lease is not None:  # dispatch_waiters took it out of the queue
                    lease, waiter.lease = waiter.lease, None
                    waiter.event.clear()
                    return lease
                if waiter.error is not None:
                    raise waiter.error
                if recheck and time.monotonic() < deadline:
                    try:
                        lease = self._lease(waiter.route, waiter.exclude)
                    except NoServer as exc:
                        if exc.code == "at_capacity":
                            continue
                        self.waiters.remove(waiter)
                        raise
                    self.waiters.remove(waiter)
                    return lease
                self.waiters.remove(waiter)
            message = f"every server that can take this request stayed at its max_concurrent for {timeout:g}s"
            raise NoServer(503, "queue_timeout", message, retry_after="1")

    def hold(self, server: BackendServer) -> Lease:
        """Under the lock: a slot on `server` (a copy), cap or not; then `take_shared(lease)` outside it."""
        self.in_flight[server.server_id] = self.in_flight.get(server.server_id, 0) + 1
        return Lease(self, server, None)

    def take_shared(self, lease: Lease, enforce_cap: bool = False) -> bool:
        """Outside the lock: a capped server's slot in Redis too; False (the lease given back) when the cluster is full.

        Without a cap, or without Redis, nothing is asked. When Redis does not answer, the
        request goes on under this process's own count (the last snapshot routes), with a
        warning once per outage.
        """
        slots, server = self.shared_slots, lease.server
        if slots is None or server is None or not server.max_concurrent:
            return True  # the plain path: no round trip
        lease_id = slots.new_lease_id()
        try:
            took = slots.take(server.server_id, server.max_concurrent if enforce_cap else None, lease_id)
        except RedisUnavailable:
            if not self._caps_local:
                self._caps_local = True
                log.warning("Redis does not answer: each gateway process enforces max_concurrent on its own")
            return True
        except BaseException:
            self.release_lease(lease)
            raise
        if self._caps_local:
            self._caps_local = False
            log.info("Redis answers again: max_concurrent holds across the gateway processes")
        if took:
            lease.shared_id = lease_id
            return True
        self._give_back(lease)
        return False

    def release_lease(self, lease: Lease) -> None:
        """Free a lease's slot once, and hand it to the first queued request that can use it."""
        try:
            if lease.shared_id is not None:
                self._release_shared(lease)
        finally:  # the local slot goes whatever happened to the shared one
            with self._lock:
                if not lease.released and lease.server is not None:
                    lease.released = True
                    self._drop(lease.server.server_id)
                    self.dispatch_waiters()

    def _release_shared(self, lease: Lease) -> None:
        """Outside the lock: free the lease's slot in Redis once, before the local one goes to a waiter."""
        with self._lock:
            lease_id, lease.shared_id = lease.shared_id, None
        if lease_id is None or self.shared_slots is None or lease.server is None:
            return
        try:
            self.shared_slots.release(lease.server.server_id, lease_id)
        except RedisUnavailable as exc:  # the slot expires within the TTL, unrenewed
            log.debug("could not free slot %s on %s: %s", lease_id, lease.server.server_id, exc)

    def _give_back(self, lease: Lease) -> None:
        """Free the local slot of a lease the cluster refused, waking nobody: the server is full everywhere."""
        assert lease.server is not None
        with self._lock:
            lease.released = True
            self._drop(lease.server.server_id)

    def _drop(self, server_id: str) -> None:
        """Under the lock: one slot fewer in flight on `server_id`."""
        count = self.in_flight.get(server_id, 0) - 1
        if count > 0:
            self.in_flight[server_id] = count
        else:
            self.in_flight.pop(server_id, None)

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
