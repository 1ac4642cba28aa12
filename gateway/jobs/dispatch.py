"""Push dispatch: queued jobs go to registered servers through the same routing as requests."""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
from collections.abc import Callable

from gateway.cluster.connection import RedisUnavailable
from gateway.fleet.resources import GIB
from gateway.jobs.interface import JobStore
from gateway.jobs.records import (
    CANCELLED,
    DEFAULT_PRIORITY,
    PUSH,
    QUEUED,
    RUNNING,
    Job,
    JobError,
    JobRequest,
    JobResult,
)
from gateway.jobs.rows import pairs
from gateway.manager import BackendManager
from gateway.proxy.forwarding import REQUIRED_MEMORY_HEADER
from gateway.proxy.upstream import ClientLeft, ConnectFailed, IncompleteBody, UpstreamPool, UpstreamResponse
from gateway.routing.admission import Lease, NoServer, RouteRequest

log = logging.getLogger(__name__)
IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})
MEMORY_HEADER = REQUIRED_MEMORY_HEADER.lower()
KEYS_LABEL = "idempotency-keys"  # a server's label: `kept` means a repeated key gets the first answer, not new work
PEEK = 200  # queued jobs looked at per round: enough to find work for every free slot
IDLE_ROUND = 1.0  # seconds between rounds when nothing wakes the dispatcher
KEEP_RETRY = 0.5  # seconds between tries to store a run's end while Redis is away


class Run:
    """One job's request in flight, and the means to stop it: its cancel is a closed socket.

    The upstream client abandons a request whose client socket closes while the head is awaited
    (it is how a client that hangs up frees its slot); a job's "client" is one end of a socket
    pair, and a cancel closes the other. Once the head is in, the answer itself is closed.
    """

    def __init__(self, token: str) -> None:
        self.token = token  # the job's lease, renewed while it runs
        self.watched, self._cancel = socket.socketpair()
        self.upstream: UpstreamResponse | None = None
        self.cancelled = False
        self.requeue = False  # stopped by the gateway's own stop, not by a client: it runs again later

    def cancel(self, requeue: bool = False) -> None:
        self.cancelled, self.requeue = True, requeue
        with contextlib.suppress(OSError):
            self._cancel.close()
        if self.upstream is not None:
            self.upstream.close()

    def close(self) -> None:
        for sock in (self.watched, self._cancel):
            with contextlib.suppress(OSError):
                sock.close()


class Dispatcher:
    """Hands queued jobs to servers with a free slot, each run in a thread (a greenlet) of its own.

    A round looks at the next queued jobs in order and takes a slot for each, without waiting;
    a job whose route has no free server stays queued, and the jobs behind it are still tried.
    Anything that may free a slot or bring a server (a submission, a finished job, a
    registration, a recovery) wakes it; otherwise it looks again every second. Every third of a
    lease it renews the leases of the jobs it runs: a lease runs out only when its process died
    (or lost Redis for that long), and then any process's sweep queues the job again.
    """

    def __init__(
        self,
        store: JobStore,
        manager: BackendManager,
        pool_for: Callable[[str], UpstreamPool],
        finished: Callable[[Job], None],
        lease_seconds: float,
        max_attempts: int,
        max_result_bytes: int,
        started: Callable[[Job], None] | None = None,
        rename: Callable[[JobRequest, str], bytes] | None = None,
        requeued: Callable[[Job], None] | None = None,
    ) -> None:
        self.store = store
        self.manager = manager
        self.pool_for = pool_for
        self.finished = finished
        self.lease_seconds = lease_seconds
        self.max_attempts = max_attempts
        self.max_result_bytes = max_result_bytes
        self.started = started
        self.rename = rename  # an LLM job's body with the model named as the server names it (model_map)
        self.requeued = requeued
        self.running: dict[str, Run] = {}  # job id -> its request in flight
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._runs: set[threading.Thread] = set()
        self._full = False  # a full round is asked for
        # Jobs just queued: priority, id, model, GPU memory.
        self._fresh: list[tuple[int, str, str | None, int | None]] = []
        self._fresh_lock = threading.Lock()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="job-dispatch", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop dispatching; running requests are closed and their jobs go back to the queue."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        for run in list(self.running.values()):
            run.cancel(requeue=True)
        for thread in list(self._runs):
            thread.join(timeout=5)

    def wake(self, job: Job | None = None) -> None:
        """Look at the whole queue now; or, for a job just queued, at that job alone.

        A submission needs no full round: every queued job older than it found no server at the
        last round, and a slot that frees (a job's end, a server that comes) wakes a full one.
        Under a burst of submissions, full rounds would read the queue's head once per job.
        """
        if job is None:
            self._full = True
            self._wake.set()
        else:
            self.wake_fresh(job.job_id, job.model, required_bytes(job.request.headers), job.priority)

    def wake_fresh(self, job_id: str, model: str | None, memory: int | None, priority: int = DEFAULT_PRIORITY) -> None:
        """Look at one job just queued (here or, told through Redis, by another process)."""
        with self._fresh_lock:
            self._fresh.append((priority, job_id, model, memory))
        self._wake.set()

    def _loop(self) -> None:
        renew_every = self.lease_seconds / 3
        next_renewal = time.monotonic() + renew_every
        while not self._stop.is_set():
            self._wake.wait(min(IDLE_ROUND, renew_every))
            self._wake.clear()
            full, self._full = self._full, False
            with self._fresh_lock:
                fresh, self._fresh = self._fresh, []
            try:
                if time.monotonic() >= next_renewal:
                    next_renewal = time.monotonic() + renew_every
                    self.renew()
                if full or not fresh:  # not fresh: the round every second, which nothing else may do
                    self.dispatch_round()
                else:  # by priority: a server that came meanwhile takes the first of them, as a round would
                    self.dispatch([(job_id, model, memory) for _, job_id, model, memory in sorted(fresh, key=_first)])
            except RedisUnavailable:  # logged once by Redis.call; the jobs wait in Redis
                self._full = True
                self._stop.wait(IDLE_ROUND)
            except Exception:  # the loop must outlive any one round: a job stays queued, not lost
                log.exception("job dispatch round failed; trying again")
                self._stop.wait(IDLE_ROUND)

    def renew(self) -> None:
        """Extend the lease of every job running here; stop one that was cancelled elsewhere."""
        for job_id, run in list(self.running.items()):
            try:
                job = self.store.heartbeat(job_id, run.token, self.lease_seconds)
            except JobError as exc:
                if job_id in self.running:  # not a run that ended meanwhile: its lease ran out (Redis was away)
                    log.warning("job %s: its lease could not be renewed (%s)", job_id, exc)
                continue
            if job.status == CANCELLED and not run.cancelled:  # by a client of another process
                run.cancel()

    def dispatch_round(self) -> int:
        """Start every queued job that a server can take now; how many were started."""
        heads = [
            (job_id, model, required_bytes(pairs(headers)) if MEMORY_HEADER in headers.lower() else None)
            for job_id, model, headers in self.store.queue_heads(PEEK)
        ]  # the headers parsed only where they hold the one that matters: most jobs' do not
        return self.dispatch(heads)

    def dispatch(self, heads: list[tuple[str, str | None, int | None]]) -> int:
        """Start each of these queued jobs (id, model, GPU memory needed) that a server can take now, in order.

        A slot is taken for each job first, then every one of them is claimed in one call (one
        commit): claimed one at a time, a drain would wait for a commit per job in this one loop.
        """
        taken: list[tuple[str, Lease]] = []
        try:
            blocked: set[tuple[str | None, int | None]] = set()  # (model, GPU memory) that found no slot this round
            for job_id, model, memory in heads:
                if (model, memory) in blocked:
                    continue
                try:
                    taken.append(
                        (job_id, self.manager.acquire(RouteRequest(model=model, required_bytes=memory), timeout=0))
                    )
                except NoServer:
                    blocked.add((model, memory))
            wanted = [(job_id, _holder(lease)) for job_id, lease in taken]
            claimed = self.store.claim_jobs(wanted, PUSH, self.lease_seconds) if wanted else []
        except BaseException:
            for _, lease in taken:
                lease.release()
            raise
        started = handed = lost = 0
        try:
            for (_, lease), job in zip(taken, claimed, strict=True):
                if job is None:  # cancelled, or taken by a worker or another process, since the peek
                    lease.release()
                    lost += 1
                else:
                    self._start(job, lease)
                    started += 1
                handed += 1
        finally:
            for _, lease in taken[handed:]:  # not handed to a run: a start that failed, and the ones after it
                lease.release()
        if lost:
            self.wake()  # the slots of the jobs lost may suit a job this round passed over: one full round
        return started

    def _start(self, job: Job, lease: Lease) -> None:
        """Run a claimed job in a thread of its own, which releases `lease` when it ends."""
        # At INFO a job tells its end only, in one line, as a proxied request does: three were a fifth of a drain's CPU.
        log.debug("job %s dispatched to %s (attempt %d)", job.job_id, _holder(lease), job.attempts)
        if self.started is not None:
            self.started(job)
        thread = threading.Thread(target=self.run, args=(job, lease), name=f"job-{job.job_id[:8]}", daemon=True)
        self._runs.add(thread)
        thread.start()

    def cancel(self, job_id: str) -> bool:
        """Close a running job's request; False if it is not running here."""
        run = self.running.get(job_id)
        if run is None:
            return False
        run.cancel()
        return True

    def run(self, job: Job, lease: Lease) -> None:
        """Send one job's request, keep the answer, and free the slot, whatever happens."""
        assert lease.server is not None and job.lease_token is not None
        server, token = lease.server, job.lease_token
        run = self.running[job.job_id] = Run(token)
        done: Job | None = None
        try:
            body = job.request.body
            if self.rename is not None and lease.actual_model is not None and lease.actual_model != job.model:
                body = self.rename(job.request, lease.actual_model)
            repeatable = job.request.method in IDEMPOTENT_METHODS or keeps_keys(server.labels)
            done = self._exchange(job, server.server_id, server.url, token, run, body, repeatable)
            if run.requeue and done.status == RUNNING:
                done = self._keep(self.store.release, job.job_id, token, "the gateway stopped while it ran")
        except (JobError, RedisUnavailable) as exc:  # its end could not be stored: its lease runs out instead
            log.warning("job %s on %s: its end was not stored (%s); it is queued again when its lease runs out",
                        job.job_id, server.server_id, exc)  # fmt: skip
        except Exception:
            log.exception("job %s on %s failed in the gateway", job.job_id, server.server_id)
            with contextlib.suppress(JobError, RedisUnavailable):
                done = self.store.fail(job.job_id, token, "internal error in the gateway", retry=False, max_attempts=1)
        finally:
            self.running.pop(job.job_id, None)
            self._runs.discard(threading.current_thread())
            run.close()
            lease.release()
        if done is None:
            self.wake()
            return
        if done.status != QUEUED:  # a slot is free: the next job may take it (a refused one waits a round)
            self.wake()
        elif self.requeued is not None:  # back in the queue: a pull worker may take it before the next round
            self.requeued(done)
        if done.finished and not (run.cancelled and not run.requeue):  # a cancel told its own end
            self.finished(done)

    def _exchange(self, job: Job, server_id: str, url: str, token: str, run: Run, body: bytes, repeatable: bool) -> Job:
        """Send the job; `repeatable` when a second try is safe (the method, or a server that keeps keys)."""
        request = job.request
        headers = dict(request.headers)
        headers["Idempotency-Key"] = job.job_id  # a backend that keeps keys can drop a repeat
        started = time.monotonic()
        try:
            upstream = run.upstream = self.pool_for(url).request(
                request.method, request.target, headers, body, run.watched
            )
        except ClientLeft:  # cancelled while it waited for the answer
            return self._keep(self.store.get, job.job_id)
        except ConnectFailed as exc:  # nothing was sent: another server, or later, at no cost
            reason = exc.strerror or "cannot connect"
            self.manager.report_failure(server_id, url, reason)
            return self._keep(self.store.release, job.job_id, token, f"{server_id}: {reason}")
        except OSError as exc:
            return self._failed(job, server_id, token, f"{server_id}: {exc.strerror or exc}", repeatable)
        try:
            answer = self._read(upstream)
        except OSError as exc:
            upstream.close()
            if run.cancelled:
                return self._keep(self.store.get, job.job_id)
            return self._failed(job, server_id, token, f"{server_id} broke off its answer: {exc}", repeatable)
        upstream.release_conn()
        self.manager.report_result(server_id, upstream.status < 500, f"HTTP {upstream.status}")
        # A 5xx is told here, since the job may go back to the queue; an answer that ends it, by its end's line.
        log.log(
            logging.INFO if upstream.status >= 500 else logging.DEBUG, "job %s ran on %s: HTTP %d in %.1f ms",
            job.job_id, server_id, upstream.status, (time.monotonic() - started) * 1000,
        )  # fmt: skip
        result = JobResult(upstream.status, tuple(upstream.headers.iteritems()), answer)
        if upstream.status >= 500:  # the server's own failure: its answer is kept, and tried again if safe
            reason = f"{server_id}: HTTP {upstream.status}"
            return self._keep(self.store.fail, job.job_id, token, reason, repeatable, self.max_attempts, result)
        return self._keep(self.store.succeed, job.job_id, token, result)

    def _keep(self, write: Callable[..., Job], *args: object) -> Job:
        """A run's end stored, tried again while Redis is away, for up to a lease (then the job is the sweep's)."""
        deadline = time.monotonic() + self.lease_seconds
        while True:
            try:
                return write(*args)
            except RedisUnavailable:
                if time.monotonic() >= deadline or self._stop.is_set():
                    raise
                time.sleep(KEEP_RETRY)

    def _read(self, upstream: UpstreamResponse) -> bytes:
        """The whole answer, within the result limit; IncompleteBody if it was cut short."""
        parts, size = [], 0
        while chunk := upstream.read1(64 * 1024):
            size += len(chunk)
            if size > self.max_result_bytes:
                raise IncompleteBody(None, f"its answer is over the job result limit of {self.max_result_bytes} bytes")
            parts.append(chunk)
        if upstream.length_remaining:
            raise IncompleteBody(None, f"it ended {upstream.length_remaining} bytes before its Content-Length")
        return b"".join(parts)

    def _failed(self, job: Job, server_id: str, token: str, reason: str, retry: bool) -> Job:
        """A failure after the request went out: tried again only where a repeat is safe."""
        log.warning("job %s failed on %s: %s (%s)", job.job_id, server_id, reason, "retried" if retry else "final")
        return self._keep(self.store.fail, job.job_id, token, reason, retry, self.max_attempts)


def _holder(lease: Lease) -> str:
    """The server a lease is on: the manager's leases always name one."""
    assert lease.server is not None
    return lease.server.server_id


def required_bytes(headers: tuple[tuple[str, str], ...]) -> int | None:
    """The GPU memory a job's request asked for (X-Required-GPU-Memory-GB, checked when it came)."""
    for name, value in headers:
        if name.lower() == REQUIRED_MEMORY_HEADER.lower():
            try:
                return int(float(value) * GIB)
            except ValueError:
                return None
    return None


def keeps_keys(labels: dict[str, str]) -> bool:
    """A server that declared it drops a repeated Idempotency-Key (label `idempotency-keys=kept`)."""
    return labels.get(KEYS_LABEL) == "kept"


def _first(fresh: tuple[int, str, str | None, int | None]) -> int:
    """A fresh job's priority: 0 runs first (sorted() keeps their order within one)."""
    return fresh[0]
