"""Wakes across processes: a job queued, finished or cancelled in one gateway process is told to the rest.

With Redis, each process publishes on the `jobs:wake` channel what woke its own dispatcher,
long polls and waiting clients, and listens for the others' in a thread (a greenlet under
gevent) of its own. A message may be lost (a listener away while Redis was, a publish that
failed): nothing depends on one. The dispatcher still looks at the queue every second, a
waiting client reads its job again every second, a long poll claims again every few seconds,
and a listener that connects again wakes everything once.
"""

from __future__ import annotations

import contextlib
import json
import logging
import secrets
import threading
from collections.abc import Callable
from dataclasses import dataclass

from gateway.cluster.connection import Redis, RedisUnavailable
from gateway.jobs.records import DEFAULT_PRIORITY

log = logging.getLogger(__name__)
WAKE_QUEUED, WAKE_FINISHED, WAKE_CANCEL = "queued", "finished", "cancel"
LISTEN_SECONDS = 1.0  # the longest one wait for a message lasts: how soon a stop is seen
RECONNECT_SECONDS = (0.5, 5.0)  # the first and the longest pause before subscribing again


@dataclass(frozen=True)
class Wake:
    """What another process saw: a job queued (with what routes it), finished, or cancelled while it ran."""

    event: str
    job_id: str
    task_type: str | None = None
    model: str | None = None
    memory: int | None = None  # the GPU memory its request asks for, in bytes
    priority: int = DEFAULT_PRIORITY  # a queued job's: the dispatcher looks at fresh jobs in that order


class JobWakes:
    """The jobs' pub/sub channel: publish this process's wakes, hear every other process's."""

    def __init__(self, shared: Redis) -> None:
        self.redis = shared
        self.channel = shared.key("jobs:wake")
        self.origin = secrets.token_hex(8)  # this process's own messages, which it skips
        self.listening = threading.Event()  # set while subscribed
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, on_wake: Callable[[Wake], None], on_reconnect: Callable[[], None]) -> None:
        """Listen in the background: `on_wake` for each message, `on_reconnect` after an outage."""
        self._thread = threading.Thread(
            target=self._listen, args=(on_wake, on_reconnect), name="job-wakes", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=LISTEN_SECONDS + 2)

    def publish(self, wake: Wake) -> None:
        """Tell the other processes; a wake Redis did not take is dropped (their rounds catch it)."""
        message = json.dumps(
            {"o": self.origin, "e": wake.event, "j": wake.job_id, "t": wake.task_type, "m": wake.model,
             "b": wake.memory, "p": wake.priority},
            separators=(",", ":"),
        )  # fmt: skip
        with contextlib.suppress(RedisUnavailable):
            self.redis.call("publish a job wake", self.redis.client.publish, self.channel, message)

    def _listen(self, on_wake: Callable[[Wake], None], on_reconnect: Callable[[], None]) -> None:
        pause, subscribed_before = RECONNECT_SECONDS[0], False
        while not self._stop.is_set():
            pubsub = self.redis.client.pubsub(ignore_subscribe_messages=True)
            try:
                self.redis.call("subscribe to job wakes", pubsub.subscribe, self.channel)
                self.listening.set()
                if subscribed_before:  # what was published meanwhile is lost: look at everything once
                    on_reconnect()
                subscribed_before, pause = True, RECONNECT_SECONDS[0]
                while not self._stop.is_set():
                    message = self.redis.call("listen for job wakes", pubsub.get_message, timeout=LISTEN_SECONDS)
                    if message is not None and message.get("type") == "message":
                        wake = self._read(message["data"])
                        if wake is not None:
                            on_wake(wake)
            except RedisUnavailable:  # logged once by Redis.call; subscribed again once it answers
                self.listening.clear()
                self._stop.wait(pause)
                pause = min(pause * 2, RECONNECT_SECONDS[1])
            except Exception:  # the listener must outlive one bad message or callback
                log.exception("job wake listener failed; listening again")
                self.listening.clear()
                self._stop.wait(pause)
            finally:
                with contextlib.suppress(Exception):  # a connection Redis already dropped may fail to close
                    pubsub.close()
        self.listening.clear()

    def _read(self, data: bytes) -> Wake | None:
        """The message as a Wake; None for this process's own, or one it cannot read."""
        try:
            fields = json.loads(data)
            if fields["o"] == self.origin:
                return None
            priority = fields.get("p", DEFAULT_PRIORITY)
            return Wake(fields["e"], fields["j"], fields.get("t"), fields.get("m"), fields.get("b"), int(priority))
        except (ValueError, KeyError, TypeError):
            log.warning("a job wake that could not be read was dropped: %r", data[:200])
            return None
