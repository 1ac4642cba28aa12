"""Pull workers: who they are, what they serve, when they were last heard from, and their long polls.

Workers are kept in memory only: a worker calls again within seconds (a lease, a heartbeat),
so after a restart each one is back as soon as it does. The jobs a worker holds are the
store's (its running pulled jobs), never a count kept here that could drift.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

from gateway.jobs.records import Job

GONE_AFTER_LEASES = 3  # a worker silent for this many lease periods is shown as gone
FORGET_SECONDS = 86400.0  # a gone worker is dropped from the list after a day


@dataclass(frozen=True)
class LeaseAsk:
    """What a worker asks for: its id, the routes (task types) or models it serves, how many jobs."""

    worker_id: str
    routes: tuple[str, ...] = ()
    models: tuple[str, ...] = ()
    max_jobs: int = 1

    def wants(self, job: Job) -> bool:
        """Whether this worker serves `job` (a worker that names nothing serves every job)."""
        return self.serves(job.task_type, job.model)

    def serves(self, task_type: str, model: str | None) -> bool:
        """Whether this worker serves jobs of this task type and model."""
        if not self.routes and not self.models:
            return True
        return task_type in self.routes or (model is not None and model in self.models)


@dataclass
class Worker:
    """One worker as last heard from."""

    ask: LeaseAsk
    last_lease_at: float | None = None
    last_heartbeat_at: float | None = None
    last_seen_at: float = 0.0
    polling: int = 0  # its long polls open now: a worker waiting for work is not gone


class TooManyPolls(Exception):
    """WORKER_MAX_LONG_POLLS long polls are open already."""


class _Poll:
    """One open long poll: what it waits for, and the event that wakes it."""

    __slots__ = ("ask", "event")

    def __init__(self, ask: LeaseAsk) -> None:
        self.ask = ask
        self.event = threading.Event()  # gevent's under gunicorn: a waiting poll is a parked greenlet


class WorkerRegistry:
    """The workers heard from, and the long polls waiting for jobs, woken as jobs are queued."""

    def __init__(
        self,
        lease_seconds: float,
        max_polls: int = 1000,
        clock: Callable[[], float] = time.time,
        recheck: float | None = None,
    ) -> None:
        self.lease_seconds = lease_seconds
        self.max_polls = max_polls
        self.recheck = recheck  # claim again this often while waiting (None: only when woken)
        self.clock = clock
        self._workers: dict[str, Worker] = {}
        self._polls: set[_Poll] = set()
        self._lock = threading.Lock()

    def poll(
        self, ask: LeaseAsk, claim: Callable[[], list[Job]], seconds: float, gone: Callable[[], bool] | None = None
    ) -> list[Job]:
        """Claim jobs for `ask`, waiting up to `seconds` for one to be queued; [] if none came.

        TooManyPolls when max_polls are open already. `gone` says the caller hung up, so that
        no job is handed to a connection nobody reads.
        """
        waiting = _Poll(ask)
        with self._lock:
            if len(self._polls) >= self.max_polls:
                raise TooManyPolls(f"{self.max_polls} long polls are open (WORKER_MAX_LONG_POLLS)")
            self._polls.add(waiting)
            worker = self._seen(ask.worker_id, ask)
            worker.last_lease_at = worker.last_seen_at
            worker.polling += 1
        try:
            deadline = time.monotonic() + seconds
            while True:  # each turn claims, then waits out what is left of `seconds`: bounded by it
                waiting.event.clear()  # before the claim: a job queued after it still wakes the wait
                if gone is not None and gone():
                    return []
                jobs = claim()
                left = deadline - time.monotonic()
                if jobs or left <= 0:
                    return jobs
                waiting.event.wait(left if self.recheck is None else min(left, self.recheck))
        finally:
            with self._lock:
                self._polls.discard(waiting)
                worker.polling -= 1
                worker.last_seen_at = self.clock()

    def notify(self, task_type: str, model: str | None) -> None:
        """A job of this task type and model was queued: wake the long polls that would take it."""
        with self._lock:
            matching = [waiting for waiting in self._polls if waiting.ask.serves(task_type, model)]
        for waiting in matching:
            waiting.event.set()

    def notify_all(self) -> None:
        """Wake every long poll, to claim again."""
        with self._lock:
            polls = list(self._polls)
        for waiting in polls:
            waiting.event.set()

    def heard_from(self, worker_id: str, heartbeat: bool = False) -> None:
        """A worker called about a job it holds (a heartbeat, a complete, a fail)."""
        with self._lock:
            worker = self._seen(worker_id)
            if heartbeat:
                worker.last_heartbeat_at = worker.last_seen_at

    def _seen(self, worker_id: str, ask: LeaseAsk | None = None) -> Worker:
        worker = self._workers.get(worker_id)
        if worker is None:
            worker = self._workers[worker_id] = Worker(ask or LeaseAsk(worker_id))
        elif ask is not None:
            worker.ask = ask
        worker.last_seen_at = self.clock()
        return worker

    def active(self, worker: Worker, now: float) -> bool:
        return worker.polling > 0 or now - worker.last_seen_at <= GONE_AFTER_LEASES * self.lease_seconds

    def slots(self, job: Job) -> int:
        """How many jobs like `job` the active workers take at once (their last max_jobs)."""
        now = self.clock()
        with self._lock:
            workers = list(self._workers.values())
        return sum(w.ask.max_jobs for w in workers if self.active(w, now) and w.ask.wants(job))

    def describe(self, held: dict[str, list[str]]) -> list[dict[str, object]]:
        """Every worker heard from (and any that holds a job since the gateway started), by id."""
        now = self.clock()
        with self._lock:
            workers = {worker_id: replace(worker) for worker_id, worker in self._workers.items()}
        rows: list[dict[str, object]] = []
        for worker_id in sorted(workers.keys() | held.keys()):
            worker = workers.get(worker_id)
            rows.append(
                {
                    "worker_id": worker_id,
                    "routes": list(worker.ask.routes) if worker else [],
                    "models": list(worker.ask.models) if worker else [],
                    "max_jobs": worker.ask.max_jobs if worker else None,
                    "state": "active" if worker is None or self.active(worker, now) else "gone",
                    "polling": bool(worker and worker.polling),
                    "last_lease_at": worker.last_lease_at if worker else None,
                    "last_heartbeat_at": worker.last_heartbeat_at if worker else None,
                    "last_seen_at": worker.last_seen_at if worker else None,
                    "jobs": held.get(worker_id, []),
                }
            )
        return rows

    def forget(self, older_than: float = FORGET_SECONDS) -> int:
        """Drop the workers silent for `older_than` seconds; how many were dropped."""
        cutoff = self.clock() - older_than
        with self._lock:
            silent = [i for i, w in self._workers.items() if w.polling == 0 and w.last_seen_at <= cutoff]
            for worker_id in silent:
                del self._workers[worker_id]
        return len(silent)
