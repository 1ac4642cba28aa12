"""The pull agent: a GPU host behind NAT leases jobs from the gateway and runs them on its local service.

It dials out only: a long poll for jobs (POST /workers/lease), the job's request to the local
GPU service, heartbeats while it runs, and its answer back (POST /jobs/<id>/complete or /fail).
"""

from __future__ import annotations

import base64
import logging
import threading
import time
from collections.abc import Sequence
from typing import Any

import requests
from urllib3.exceptions import ConnectTimeoutError, NewConnectionError

from resource_monitor.agent import RETRY_BASE, RETRY_CAP, Refused, gateway_reply, retry_delay

log = logging.getLogger(__name__)

REQUEST_TIMEOUT = 5.0  # for every gateway call, beyond a long poll's own wait
MAX_ERROR_LENGTH = 2000  # the gateway takes a fail's error up to this long
CONNECT_TIMEOUT = 5.0  # to the local service
# Methods a server may be sent twice, as the gateway's push dispatch judges (gateway/jobs/dispatch.py).
SAFE_TO_REPEAT = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})
# Set by requests itself, or about one hop only: never copied from the job's request or answer.
NOT_COPIED = frozenset(
    {"host", "content-length", "transfer-encoding", "connection", "keep-alive", "te", "trailer", "upgrade"}
)


class Held:
    """A job this agent holds: its lease, and whether it is over for this agent (cancelled, stale, handed back)."""

    def __init__(self, job: dict[str, Any]) -> None:
        self.job_id: str = job["job_id"]
        self.token: str = job["lease_token"]
        self.job = job
        self.over = threading.Event()  # set: stop sending heartbeats, report nothing more
        self.why = ""


class PullAgent:
    """Leases jobs for `routes` or `models`, runs up to `max_jobs` at once, and reports each answer."""

    def __init__(
        self,
        gateway_url: str,
        token: str,
        forward_to: str,
        worker_id: str,
        routes: Sequence[str] = (),
        models: Sequence[str] = (),
        max_jobs: int = 1,
        wait: float = 30.0,
        job_timeout: float = 3600.0,
        retry_base: float = RETRY_BASE,
        retry_cap: float = RETRY_CAP,
    ) -> None:
        self.gateway_url = gateway_url.rstrip("/")
        self.forward_to = forward_to.rstrip("/")
        self.worker_id = worker_id
        self.routes, self.models = list(routes), list(models)
        self.max_jobs = max_jobs
        self.wait = wait
        self.job_timeout = job_timeout
        self.retry_base, self.retry_cap = retry_base, retry_cap
        self.lease_seconds = 30.0  # until the gateway says (every lease answer does)
        self.attempts = 0  # lease calls made
        self.local_failures = 0  # connects to the local service that failed in a row: lease less often
        self.held: dict[str, Held] = {}
        self._lock = threading.Lock()
        self._freed = threading.Event()  # a job ended: a slot is free for the next lease
        self._stop = threading.Event()
        self._gateway = requests.Session()
        self._gateway.headers["Authorization"] = f"Bearer {token}"
        self._local = requests.Session()
        self._thread = threading.Thread(target=self._run, name=f"pull-{worker_id}", daemon=True)

    def start(self) -> None:
        """Lease and run jobs on a thread of its own."""
        self._thread.start()

    def stop(self) -> None:
        """Stop leasing, and hand back every job held, so that another worker takes it now."""
        self._stop.set()
        self._freed.set()
        with self._lock:
            held = list(self.held.values())
        for job in held:
            self._hand_back(job, "the worker stopped before the job finished")
        self._thread.join(timeout=1)  # a long poll still open ends with the process; its jobs come back
        self._local.close()

    # -- leasing ---------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._lease_loop()
        finally:
            self._gateway.close()

    def _lease_loop(self) -> None:
        failures = 0
        while not self._stop.is_set():
            with self._lock:
                free = self.max_jobs - len(self.held)
            if free <= 0:
                self._freed.wait(self.lease_seconds)  # a job's end sets it; bounded all the same
                self._freed.clear()
                continue
            if self.local_failures:  # the service is down: leasing now would only spend the jobs' attempts
                self._stop.wait(retry_delay(self.local_failures, self.retry_base, self.retry_cap))
                if self._stop.is_set():
                    break
            self.attempts += 1
            delay = 0.0
            try:
                jobs = self.lease(free)
            except (Refused, requests.RequestException, OSError) as exc:
                failures += 1
                refused = isinstance(exc, Refused)  # an operator must act: ask again, but not often
                delay = self.retry_cap if refused else retry_delay(failures, self.retry_base, self.retry_cap)
                level = logging.ERROR if refused else logging.WARNING
                log.log(level, "cannot lease jobs from %s: %s; retrying in %.1f s", self.gateway_url, exc, delay)
            else:
                if failures:
                    log.info("leasing jobs from %s again", self.gateway_url)
                failures = 0
                for job in jobs:
                    self._take(job)
                if not jobs and self.wait < 1:  # a poll that hardly waits must not spin
                    delay = 1.0
            if delay:
                self._stop.wait(delay)

    def lease(self, max_jobs: int) -> list[dict[str, Any]]:
        """One long poll: the jobs leased (none after `wait` seconds), or Refused / a requests error."""
        body: dict[str, Any] = {"worker_id": self.worker_id, "max_jobs": max_jobs, "wait_seconds": self.wait}
        if self.routes:
            body["routes"] = self.routes
        if self.models:
            body["models"] = self.models
        response = self._post("/workers/lease", body, timeout=self.wait + REQUEST_TIMEOUT)
        if response.status_code == 204:
            return []
        reply = gateway_reply(response, "--pull-from")
        self.lease_seconds = float(reply.get("lease_seconds") or self.lease_seconds)
        return list(reply["jobs"])

    def _take(self, job: dict[str, Any]) -> None:
        held = Held(job)
        with self._lock:
            self.held[held.job_id] = held
        if self._stop.is_set():  # leased as the agent stopped: back at once
            self._hand_back(held, "the worker stopped before the job started")
            return
        log.info("job %s leased (attempt %s): %s %s", held.job_id, job.get("attempt"), *_request_line(job))
        threading.Thread(target=self._run_job, args=(held,), name=f"job-{held.job_id[:8]}", daemon=True).start()
        threading.Thread(target=self._beat, args=(held,), name=f"beat-{held.job_id[:8]}", daemon=True).start()

    # -- one job -----------------------------------------------------------------------------

    def _run_job(self, held: Held) -> None:
        """Send the job's request to the local service and report what came of it, whatever happens."""
        try:
            outcome = self._forward(held)
            if not held.over.is_set():
                self._report(held, *outcome)
        except Exception:  # this job's thread must end with the job handed back, not held
            log.exception("job %s failed in the agent", held.job_id)
            self._report(held, "fail", {"error": "the pull agent failed while it ran the job", "retry": False})
        finally:
            held.over.set()
            with self._lock:
                self.held.pop(held.job_id, None)
            self._freed.set()

    def _forward(self, held: Held) -> tuple[str, dict[str, Any]]:
        """The local service's answer as a complete, or why it failed as a fail (retry if safe)."""
        payload = held.job["payload"]
        method = payload["method"]
        headers = [(name, value) for name, value in payload["headers"] if name.lower() not in NOT_COPIED]
        headers.append(("Idempotency-Key", held.job_id))  # a service that keeps keys drops a repeat
        try:
            response = self._local.request(
                method,
                self.forward_to + payload["target"],
                headers=_joined(headers),
                data=base64.b64decode(payload["body"]),
                timeout=(CONNECT_TIMEOUT, self.job_timeout),
                allow_redirects=False,
                stream=True,
            )
            with response:
                body = response.raw.read(decode_content=False)  # as sent: its Content-Encoding stays true
        except requests.RequestException as exc:
            sent = not _not_sent(exc)
            self.local_failures = 0 if sent else self.local_failures + 1
            retry = method in SAFE_TO_REPEAT or not sent
            where = "cannot reach the local service" if not sent else "the local service broke off"
            return "fail", {"error": f"{where}: {exc}"[:MAX_ERROR_LENGTH], "retry": retry}
        self.local_failures = 0
        kept = [[name, value] for name, value in response.raw.headers.items() if name.lower() not in NOT_COPIED]
        answer = {
            "status": response.status_code,
            "headers": kept,
            "body": base64.b64encode(body).decode("ascii"),
        }
        log.info("job %s ran: HTTP %d, %d bytes", held.job_id, response.status_code, len(body))
        if response.status_code >= 500:  # the service's own failure: kept, and tried again where safe
            return "fail", {"error": f"HTTP {response.status_code}", "retry": method in SAFE_TO_REPEAT, **answer}
        return "complete", answer

    def _beat(self, held: Held) -> None:
        """A heartbeat every lease/3 while the job runs; a cancel or a lost lease ends it for this agent."""
        while not held.over.wait(self.lease_seconds / 3):
            try:
                reply = self._job_call(held, "heartbeat", {})
            except (Refused, requests.RequestException) as exc:
                log.warning("heartbeat of job %s failed: %s", held.job_id, exc)
                continue  # the next one may get through before the lease runs out
            if reply is None:
                self._drop(held, "its lease moved on")
            elif reply.get("cancelled"):
                self._drop(held, "it was cancelled")

    def _report(self, held: Held, action: str, body: dict[str, Any]) -> None:
        """Complete or fail the job, trying again for as long as its lease lasts if the gateway is away."""
        failures, deadline = 0, time.monotonic() + self.lease_seconds
        while not held.over.is_set():
            try:
                reply = self._job_call(held, action, body)
            except Refused as exc:
                log.error("the gateway refused the %s of job %s: %s", action, held.job_id, exc)
                return
            except requests.RequestException as exc:
                failures += 1
                if time.monotonic() >= deadline:
                    log.error("cannot report job %s to %s: %s; its lease runs out", held.job_id, self.gateway_url, exc)
                    return
                held.over.wait(retry_delay(failures, self.retry_base, min(self.retry_cap, self.lease_seconds / 3)))
                continue
            if reply is None:
                log.warning("job %s: its lease moved on; the gateway keeps another worker's answer", held.job_id)
            else:
                log.info("job %s: %s; the gateway has it %s", held.job_id, action, reply.get("status"))
            return

    def _hand_back(self, held: Held, why: str) -> None:
        """Give a job back for another worker (its attempt counts), and stop sending its heartbeats."""
        if held.over.is_set():
            return
        held.over.set()
        try:
            self._job_call(held, "fail", {"error": why, "retry": True})
        except (Refused, requests.RequestException) as exc:
            log.warning("cannot hand back job %s: %s; its lease will run out", held.job_id, exc)
        else:
            log.info("job %s handed back: %s", held.job_id, why)
        with self._lock:
            self.held.pop(held.job_id, None)

    def _drop(self, held: Held, why: str) -> None:
        held.why = why
        held.over.set()
        log.info("job %s stopped: %s", held.job_id, why)

    # -- the gateway -------------------------------------------------------------------------

    def _job_call(self, held: Held, action: str, body: dict[str, Any]) -> dict[str, Any] | None:
        """POST /jobs/<id>/<action> with the lease token; None when the lease is no longer ours (409)."""
        response = self._post(f"/jobs/{held.job_id}/{action}", {"lease_token": held.token, **body})
        if response.status_code == 409:
            return None
        return gateway_reply(response, "--pull-from")

    def _post(self, path: str, body: dict[str, Any], timeout: float = REQUEST_TIMEOUT) -> requests.Response:
        # No redirects: the token would follow one to another host.
        return self._gateway.post(self.gateway_url + path, json=body, timeout=timeout, allow_redirects=False)


def _not_sent(exc: requests.RequestException) -> bool:
    """Whether the request failed before any of it reached the service (it could not connect)."""
    if isinstance(exc, requests.ConnectTimeout):
        return True
    reason = getattr(exc.args[0], "reason", None) if exc.args else None
    return isinstance(reason, NewConnectionError | ConnectTimeoutError)


def _joined(headers: list[tuple[str, str]]) -> dict[str, str]:
    """Headers as one dict, as requests takes them; a repeated name's values joined by commas (RFC 9110)."""
    joined: dict[str, str] = {}
    for name, value in headers:
        key = next((k for k in joined if k.lower() == name.lower()), name)
        joined[key] = f"{joined[key]}, {value}" if key in joined else value
    return joined


def _request_line(job: dict[str, Any]) -> tuple[str, str]:
    return job["payload"]["method"], job["payload"]["target"]
