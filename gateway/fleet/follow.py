"""Keeps this process's copy of the fleet up with Redis: a pub/sub message for speed, a version check for certainty.

Every write to the fleet bumps `fleet:version` and publishes it. A follower reloads the snapshot
when a message names a version it has not seen, and also reads the version every `poll` seconds,
so that a message lost (a dropped connection, a restart of Redis) delays a change by at most that.
Routing never waits on any of this: it reads the copy in memory.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from gateway.cluster.connection import DOWN_ERRORS, RedisUnavailable
from gateway.fleet.redis_store import RedisFleetStore, Snapshot

log = logging.getLogger(__name__)
MAX_BACKOFF = 2.0  # seconds between tries to reach Redis while it is down


class FleetFollower:
    """A daemon thread (a greenlet under gevent) that applies every new snapshot through `adopt`."""

    def __init__(
        self,
        store: RedisFleetStore,
        adopt: Callable[[Snapshot], None],
        poll: float = 0.5,
        keep: Callable[[Snapshot], None] | None = None,
        down: Callable[[], None] | None = None,
    ) -> None:
        self.store = store
        self.adopt = adopt
        self.keep = keep  # sees each snapshot before it is adopted: the host's copy on disk (fleet/local_copy.py)
        self.down = down  # called after each attempt that found Redis down: the copy may be newer than ours
        self.poll = poll
        self.seen = -1  # the version last adopted
        self._following = False  # the last attempt got as far as following: retry at once when it ends
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def catch_up(self) -> bool:
        """Adopt Redis's fleet if its version moved since the last one adopted; True if it did."""
        if self.store.version() == self.seen:
            return False
        snapshot = self.store.snapshot()
        if self.keep is not None:  # first: a request routed on this snapshot means the copy has it
            self.keep(snapshot)
        self.adopt(snapshot)
        self.seen = snapshot.version
        return True

    def start(self) -> None:
        """Start following in the background."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="fleet-follower", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Stop following; the thread ends within one poll."""
        self._stop.set()

    def _run(self) -> None:
        backoff = 0.1
        while not self._stop.is_set():
            self._following = False
            try:
                self._follow()
            except RedisUnavailable:
                self._went_down()  # Redis.call logged the outage once
            except DOWN_ERRORS as exc:  # the subscription's own connection
                self.store.redis.went_down(exc)
                self._went_down()
            except Exception:  # the follower must outlive anything, or this process stops seeing changes
                log.exception("following the fleet in Redis failed; trying again")
            backoff = 0.1 if self._following else min(MAX_BACKOFF, backoff * 2)
            self._stop.wait(backoff)

    def _went_down(self) -> None:
        if self.down is not None:
            try:
                self.down()
            except Exception:  # as above: nothing may end the follower
                log.exception("taking the host's copy of the fleet failed")

    def _follow(self) -> None:
        pubsub = self.store.redis.client.pubsub(ignore_subscribe_messages=True)
        try:
            pubsub.subscribe(self.store.channel)
            self.catch_up()
            self.store.redis.came_back()
            self._following = True
            while not self._stop.is_set():
                message = pubsub.get_message(timeout=self.poll)
                if message is None or _version(message) > self.seen:
                    self.catch_up()
        finally:
            pubsub.close()


def _version(message: dict[str, object]) -> int:
    data = message.get("data")
    try:
        return int(data) if isinstance(data, (bytes, str, int)) else -1
    except ValueError:
        return -1
