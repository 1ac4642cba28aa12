"""Callbacks: a finished job's state POSTed to its X-Callback-URL, signed as Standard Webhooks sign.

The signature is `v1,` and the base64 HMAC-SHA256, under JOB_CALLBACK_SECRET, of
`{webhook-id}.{webhook-timestamp}.{body}` (standardwebhooks.com). The webhook-id is the job id,
the same on every retry, so a receiver can drop a repeat. A delivery that fails (no answer,
or any status but 2xx) is tried again with backoff, and its state survives a restart: it is in
the job store.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import logging
import threading
import time
from collections.abc import Sequence
from urllib.parse import urlsplit

import requests

from gateway.cluster.connection import RedisUnavailable
from gateway.fleet.addresses import AddressError, Network, check_backend_address
from gateway.jobs.interface import JobStore
from gateway.jobs.records import Job

log = logging.getLogger(__name__)
TIMEOUT = 10.0  # seconds a receiver has to answer one delivery
MAX_URL_LENGTH = 2048
IDLE_ROUND = 1.0


class CallbackURLError(ValueError):
    """An X-Callback-URL that may not be called; the message says why."""


def check_callback_url(url: str, allowed_networks: Sequence[Network]) -> str:
    """The URL, if the gateway may POST to it: http(s), and an address a server could register with."""
    if len(url) > MAX_URL_LENGTH:
        raise CallbackURLError(f"X-Callback-URL is over {MAX_URL_LENGTH} characters")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise CallbackURLError("X-Callback-URL must be an http:// or https:// URL with a host")
    if parts.username or parts.password:
        raise CallbackURLError("X-Callback-URL may not carry credentials")
    try:
        parts.port  # noqa: B018  # a bad port raises here
        check_backend_address(parts.hostname, allowed_networks)
    except (AddressError, ValueError) as exc:
        raise CallbackURLError(f"X-Callback-URL's host {parts.hostname!r} may not be called: {exc}") from None
    return url


def signing_key(secret: str) -> bytes:
    """Standard Webhooks' `whsec_<base64>` secrets are their decoded bytes; any other secret, its UTF-8."""
    if secret.startswith("whsec_"):
        try:
            return base64.b64decode(secret.removeprefix("whsec_"), validate=True)
        except binascii.Error:
            pass
    return secret.encode()


def signature(key: bytes, message_id: str, timestamp: int, body: bytes) -> str:
    """The `webhook-signature` header's value."""
    signed = f"{message_id}.{timestamp}.".encode() + body
    return "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()


def signed_headers(key: bytes, message_id: str, body: bytes) -> dict[str, str]:
    """A Standard Webhooks POST's headers for `body`, signed now."""
    stamp = int(time.time())
    return {
        "Content-Type": "application/json",
        "webhook-id": message_id,
        "webhook-timestamp": str(stamp),
        "webhook-signature": signature(key, message_id, stamp, body),
    }


def payload(job: Job) -> bytes:
    """The event: `job.<status>`, when, and the job's state, with where its result is."""
    event = {
        "type": f"job.{job.status}",
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(job.finished_at or time.time())),
        "data": {
            **job.public(),
            "result_status": None if job.result is None else job.result.status,
            "result_url": f"/jobs/{job.job_id}/result",
        },
    }
    return json.dumps(event, separators=(",", ":")).encode()


class CallbackSender:
    """Delivers due callbacks in a thread of its own, one at a time, retrying with backoff."""

    def __init__(
        self,
        store: JobStore,
        secret: str,
        allowed_networks: Sequence[Network] = (),
        attempts: int = 8,
        backoff: float = 5.0,
    ) -> None:
        self.store = store
        self.key = signing_key(secret)
        self.allowed_networks = allowed_networks
        self.attempts = attempts
        self.backoff = backoff
        self.session = requests.Session()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="job-callbacks", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=TIMEOUT + 5)
        self.session.close()

    def wake(self) -> None:
        self._wake.set()

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(IDLE_ROUND)
            self._wake.clear()
            try:
                for job in self.store.callbacks_due():
                    if self._stop.is_set():
                        return
                    self.deliver(job)
            except RedisUnavailable:  # logged once by Redis.call; the callbacks stay due
                self._stop.wait(IDLE_ROUND)
            except Exception:  # the loop must outlive any one round: the callbacks stay due
                log.exception("callback round failed; trying again")
                self._stop.wait(IDLE_ROUND)

    def deliver(self, job: Job) -> bool:
        """POST one job's callback; record the outcome; True if the receiver took it."""
        assert job.callback_url is not None
        body = payload(job)
        headers = signed_headers(self.key, job.job_id, body)
        error: str | None = None
        try:
            check_callback_url(job.callback_url, self.allowed_networks)  # again: a name may resolve elsewhere now
            answer = self.session.post(
                job.callback_url, data=body, headers=headers, timeout=TIMEOUT, allow_redirects=False
            )
            answer.close()
            if not 200 <= answer.status_code < 300:
                error = f"HTTP {answer.status_code}"
        except CallbackURLError as exc:
            error = str(exc)
        except requests.RequestException as exc:
            error = type(exc).__name__
        state, wait = self.store.callback_tried(job.job_id, error, self.backoff, self.attempts)
        if state == "delivered":
            log.info("job %s: callback delivered", job.job_id)
            return True
        if state == "failed":
            log.warning("job %s: callback failed (%s) %d times; given up", job.job_id, error, self.attempts)
        else:
            log.warning("job %s: callback failed (%s); trying again in %g s", job.job_id, error, wait)
        return False
