"""The jobs: submission, waiting for an answer, estimated waits, and the sweeps behind them."""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from gateway.cluster.connection import RedisUnavailable
from gateway.jobs.callbacks import CallbackSender, check_callback_url
from gateway.jobs.dispatch import Dispatcher, required_bytes
from gateway.jobs.interface import JobStore, Submitted
from gateway.jobs.records import FAILED, FINISHED, PULL, QUEUED, RUNNING, SUCCEEDED, Job, JobRequest, JobResult, NewJob
from gateway.jobs.wakes import WAKE_CANCEL, WAKE_FINISHED, WAKE_QUEUED, JobWakes, Wake
from gateway.jobs.workers import LeaseAsk, WorkerRegistry
from gateway.manager import BackendManager
from gateway.observability.job_metrics import JobMetrics
from gateway.proxy.upstream import UpstreamPool

log = logging.getLogger(__name__)
SWEEP_SECONDS = 1.0  # how often expired leases are looked for
PURGE_SECONDS = 60.0  # how often old jobs and keys are cleared
RUN_TIME_WEIGHT = 0.2  # the newest run's share in a task type's average run time
WAIT_POLL = 1.0  # with Redis, how often a waiting client's job is read again (a wake may be lost)
POLL_RECHECK = 5.0  # with Redis, how often a long poll claims again (the same)


def fingerprint(request: JobRequest) -> str:
    """What one Idempotency-Key must keep naming: the method, the target and the body's hash."""
    return f"{request.method} {request.target} {hashlib.sha256(request.body).hexdigest()}"


@dataclass(frozen=True)
class Estimate:
    """Where a queued job stands: its place, and the seconds it may wait (None: no server is up)."""

    position: int | None
    seconds: float | None
    message: str


class JobService:
    """Owns the job store, the push dispatcher, the pull workers and the sweeps; views and the proxy call it.

    With `wakes` (Redis), what wakes this process's dispatcher, long polls and waiting clients is
    told to every other process too, and theirs to this one: a job submitted anywhere is
    dispatched by whichever process has a server or a worker for it.
    """

    def __init__(
        self,
        store: JobStore,
        manager: BackendManager,
        pool_for: Callable[[str], UpstreamPool],
        lease_seconds: float = 30.0,
        max_attempts: int = 3,
        max_result_bytes: int = 100 * 1024 * 1024,
        on_finished: Callable[[Job], None] | None = None,
        metrics: JobMetrics | None = None,
        rename: Callable[[JobRequest, str], bytes] | None = None,
        callbacks: CallbackSender | None = None,
        max_long_polls: int = 1000,
        wakes: JobWakes | None = None,
    ) -> None:
        self.store = store
        self.wakes = wakes
        self.callbacks = callbacks
        self.metrics = metrics
        self.manager = manager
        self.lease_seconds = lease_seconds
        self.max_attempts = max_attempts
        self.max_result_bytes = max_result_bytes
        self.on_finished = on_finished
        self.dispatcher = Dispatcher(
            store,
            manager,
            pool_for,
            self._finished,
            lease_seconds,
            max_attempts,
            max_result_bytes,
            started=self._started,
            rename=rename,
            requeued=self._requeued,
        )
        self.workers = WorkerRegistry(lease_seconds, max_long_polls, recheck=None if wakes is None else POLL_RECHECK)
        self._run_seconds: dict[str, float] = {}  # task type -> average run time, from finished jobs
        self._waiters: dict[str, list[threading.Event]] = {}
        self._waiters_lock = threading.Lock()
        self._stop = threading.Event()
        self._sweeper: threading.Thread | None = None

    def start(self) -> None:
        """Queue again what a dead process left running, then dispatch and sweep in the background."""
        recovered = self.store.recover()
        if recovered:
            log.warning("%d pushed jobs were running when the gateway stopped: queued again", recovered)
        if self.wakes is not None:
            self.wakes.start(self._woken, self._reconnected)
        self.dispatcher.start()
        if self.callbacks is not None:
            self.callbacks.start()
        self._sweeper = threading.Thread(target=self._sweep_loop, name="job-sweep", daemon=True)
        self._sweeper.start()

    def stop(self) -> None:
        self._stop.set()
        if self.wakes is not None:
            self.wakes.stop()
        self.dispatcher.stop()
        if self.callbacks is not None:
            self.callbacks.stop()
        if self._sweeper is not None:
            self._sweeper.join(timeout=5)

    # -- submitting and waiting ------------------------------------------------------------

    def submit(self, job: NewJob) -> Submitted:
        """Store a job (or find the one its key made) and wake the dispatcher and the pull workers."""
        submitted = self.store.submit(job)
        if submitted.created:
            log.info("job %s queued (%s, priority %d)", job.job_id, job.task_type, job.priority)
            if self.metrics is not None:
                self.metrics.submitted()
            self.dispatcher.wake(submitted.job)
            self._requeued(submitted.job)
        return submitted

    def wait(self, job_id: str, seconds: float) -> Job:
        """The job once it has finished, or as it stands after `seconds`.

        A finish here, or told by another process through Redis, wakes the wait at once; with
        Redis the job is also read again every WAIT_POLL seconds, in case that message was lost.
        """
        event = threading.Event()
        deadline = time.monotonic() + seconds
        with self._waiters_lock:
            self._waiters.setdefault(job_id, []).append(event)
        try:
            while True:
                event.clear()  # before the read: a finish after it still ends the wait
                job = self.store.get(job_id)
                left = deadline - time.monotonic()
                if job.status in FINISHED or left <= 0:
                    return job
                event.wait(left if self.wakes is None else min(left, WAIT_POLL))
        finally:
            with self._waiters_lock:
                waiting = self._waiters.get(job_id, [])
                if event in waiting:
                    waiting.remove(event)
                if not waiting:
                    self._waiters.pop(job_id, None)

    def cancel(self, job_id: str) -> Job:
        """Cancel a job: a queued one never runs, a running one has its request closed."""
        before, after = self.store.cancel(job_id)
        if before.status not in FINISHED:
            log.info("job %s cancelled (it was %s)", job_id, before.status)
            if not self.dispatcher.cancel(job_id) and before.status == RUNNING and self.wakes is not None:
                self.wakes.publish(Wake(WAKE_CANCEL, job_id))  # it may run in another process
            self._finished(after)
        return after

    def retry(self, job_id: str) -> Job:
        """Queue a failed, expired or cancelled job again (the operator's retry), its attempts reset."""
        again = self.store.retry(job_id)
        self.wake()
        self._requeued(again)
        return again

    # -- pull workers ----------------------------------------------------------------------

    def lease(self, ask: LeaseAsk, wait_seconds: float, gone: Callable[[], bool] | None = None) -> list[Job]:
        """Jobs for a pull worker, waiting up to `wait_seconds` for one to be queued; [] if none came.

        First come, first served: a queued job goes to whichever takes it first, a pull worker
        or the push dispatcher. What one answer carries is bounded by the result limit.
        """

        def claim() -> list[Job]:
            return self.store.claim_many(
                ask.worker_id,
                PULL,
                self.lease_seconds,
                ask.max_jobs,
                ask.routes,
                ask.models,
                max_bytes=self.max_result_bytes,
            )

        jobs = self.workers.poll(ask, claim, wait_seconds, gone)
        for job in jobs:
            log.info("job %s leased to worker %s (attempt %d)", job.job_id, ask.worker_id, job.attempts)
            self._started(job)
        return jobs

    def heartbeat(self, job_id: str, token: str) -> Job:
        """Extend a pulled job's lease; a cancelled job comes back as it is, for the worker to stop."""
        job = self.store.heartbeat(job_id, token, self.lease_seconds)
        self._heard(job, heartbeat=True)
        return job

    def complete(self, job_id: str, token: str, result: JobResult) -> Job:
        """Keep a pulled job's answer and wake whoever waits for it, as a pushed job's."""
        done = self.store.succeed(job_id, token, result)
        self._heard(done)
        if done.status == SUCCEEDED:  # not cancelled meanwhile: its cancel told its own end
            self._finished(done)
        return done

    def fail(self, job_id: str, token: str, error: str, retry: bool, result: JobResult | None = None) -> Job:
        """End a pulled job's attempt: queued again when `retry` and attempts are left, else failed."""
        done = self.store.fail(job_id, token, error, retry, self.max_attempts, result)
        self._heard(done)
        if done.status == FAILED:
            self._finished(done)
        elif done.status == QUEUED:
            self.wake()
            self._requeued(done)
        return done

    def _heard(self, job: Job, heartbeat: bool = False) -> None:
        if job.server_id is not None:
            self.workers.heard_from(job.server_id, heartbeat)

    def _requeued(self, job: Job) -> None:
        """A job is (back) in the queue: wake the long polls of the workers that take it, here and elsewhere."""
        self.workers.notify(job.task_type, job.model)
        if self.wakes is not None:
            memory = required_bytes(job.request.headers)
            self.wakes.publish(Wake(WAKE_QUEUED, job.job_id, job.task_type, job.model, memory, job.priority))

    def _woken(self, wake: Wake) -> None:
        """Another process queued, finished or cancelled a job."""
        if wake.event == WAKE_QUEUED:
            self.dispatcher.wake_fresh(wake.job_id, wake.model, wake.memory, wake.priority)
            if wake.task_type is not None:
                self.workers.notify(wake.task_type, wake.model)
        elif wake.event == WAKE_FINISHED:
            self._wake_waiters(wake.job_id)
        elif wake.event == WAKE_CANCEL:
            self.dispatcher.cancel(wake.job_id)

    def _reconnected(self) -> None:
        """Back on Redis after an outage, whose wakes were lost: look at the queue, every poll and every wait."""
        self.dispatcher.wake()
        self.workers.notify_all()
        with self._waiters_lock:
            waiting = [event for events in self._waiters.values() for event in events]
        for event in waiting:
            event.set()

    def _wake_waiters(self, job_id: str) -> None:
        with self._waiters_lock:
            waiting = list(self._waiters.get(job_id, ()))
        for event in waiting:
            event.set()

    def _started(self, job: Job) -> None:
        """A job left the queue for a server."""
        if self.metrics is not None and job.started_at is not None:
            self.metrics.started(job.started_at - job.created_at)

    def _finished(self, job: Job) -> None:
        """A job reached its end: wake whoever waits for it, learn its run time, count it."""
        if self.metrics is not None:
            ran = None if job.started_at is None or job.finished_at is None else job.finished_at - job.started_at
            self.metrics.finished(job.status, ran)
        if job.started_at is not None and job.finished_at is not None and job.status == "succeeded":
            took = job.finished_at - job.started_at
            average = self._run_seconds.get(job.task_type)
            self._run_seconds[job.task_type] = took if average is None else average + RUN_TIME_WEIGHT * (took - average)
        if job.status == FAILED:  # kept for the operator: GET /admin/jobs?status=failed, and retry
            log.warning("job %s is a dead letter after %d attempts: %s", job.job_id, job.attempts, job.error)
        else:
            log.info("job %s %s%s after %d attempts%s%s", job.job_id, job.status,
                     f" on {job.server_id}" if job.server_id else "", job.attempts,
                     f" (HTTP {job.result.status})" if job.result is not None else "",
                     f": {job.error}" if job.error else "")  # fmt: skip
        self._wake_waiters(job.job_id)
        if self.wakes is not None:
            self.wakes.publish(Wake(WAKE_FINISHED, job.job_id))
        if self.on_finished is not None:
            self.on_finished(job)
        if self.callbacks is not None and job.callback_url is not None:
            self.callbacks.wake()

    def check_callback_url(self, url: str) -> str:
        """The X-Callback-URL, if callbacks are on and it may be called; ValueError saying why not."""
        if self.callbacks is None:
            raise ValueError("X-Callback-URL needs JOB_CALLBACK_SECRET, which signs the callbacks; it is not set")
        return check_callback_url(url, self.callbacks.allowed_networks)

    def wake(self) -> None:
        """A server came or freed a slot: look at the queue now."""
        self.dispatcher.wake()

    # -- what a client is told -------------------------------------------------------------

    def estimate(self, job: Job, position: int | None = None) -> Estimate:
        """The job's place in the queue (asked of the store unless given) and a wait from run times and free slots."""
        if position is None or job.status != QUEUED:
            position = self.store.position(job)
        if position is None:
            return Estimate(None, None, f"the job is {job.status}")
        servers = [s for s in self.manager.list_servers() if s.is_healthy and not s.draining]
        pulled = self.workers.slots(job)  # active pull workers that take this kind of job
        if not servers and not pulled:
            message = "no GPU server is online: the job waits for one to come online, then runs"
            return Estimate(position, None, message)
        slots = sum(s.max_concurrent or 1 for s in servers) + pulled
        run = self._run_seconds.get(job.task_type)
        if run is None:
            return Estimate(position, None, f"queued at position {position}; no run time measured yet")
        seconds = round(run * (position / slots + 1), 1)
        return Estimate(position, seconds, f"queued at position {position}, about {seconds:g} s")

    # -- sweeps ----------------------------------------------------------------------------

    def _sweep_loop(self) -> None:
        next_purge = 0.0
        ticks = 0
        while not self._stop.wait(SWEEP_SECONDS):
            ticks += 1
            try:
                for job in self.store.expire_leases(self.max_attempts):
                    log.warning("job %s: its lease expired; %s", job.job_id, job.status)
                    if self.metrics is not None:
                        self.metrics.lease_expired.inc()
                    if job.finished:
                        self._finished(job)
                    else:
                        self._requeued(job)
                if ticks * SWEEP_SECONDS >= next_purge:
                    expired, deleted = self.store.purge()
                    self.workers.forget()
                    next_purge = ticks * SWEEP_SECONDS + PURGE_SECONDS
                    if self.metrics is not None:
                        self.metrics.expired(expired)
                    if expired or deleted:
                        log.info("jobs: %d expired in the queue, %d old ones deleted", expired, deleted)
                self.dispatcher.wake()  # a lease that expired put a job back
            except RedisUnavailable:  # logged once by Redis.call; the next sweep catches up
                pass
            except Exception:  # the sweep must go on; the next one catches what this one missed
                log.exception("job sweep failed")
