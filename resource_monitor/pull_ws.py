"""The pull agent over seed 004's WebSocket (`--transport ws`): jobs pushed to it, answers sent back.

It runs jobs as the HTTP agent does (resource_monitor/pull.py); only the channel differs. The
open connection is the heartbeat, so no heartbeat is sent; a job the gateway cancels is told in a
`cancel` message; and when the connection drops, the gateway queues again every job this agent
held, so the agent drops them too and connects again with the monitor's backoff.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
from typing import Any

from simple_websocket import Client, ConnectionClosed
from simple_websocket import ConnectionError as HandshakeFailed

from resource_monitor.agent import retry_delay
from resource_monitor.pull import MAX_ERROR_LENGTH, Held, PullAgent

log = logging.getLogger(__name__)


class WebSocketPullAgent(PullAgent):
    """A PullAgent whose jobs come over GET /workers/ws instead of long polls."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._ws: Client | None = None
        self._send_lock = threading.Lock()

    @property
    def socket_url(self) -> str:
        return "ws" + self.gateway_url.removeprefix("http") + "/workers/ws"

    def stop(self) -> None:
        """Close the connection: the gateway queues the jobs held again at once, for another worker."""
        self._stop.set()
        ws = self._ws
        if ws is not None:
            with contextlib.suppress(ConnectionClosed):  # it may have closed by itself
                ws.close()
        with self._lock:
            held = list(self.held.values())
        for job in held:
            self._drop(job, "the worker stopped before the job finished")
        self._thread.join(timeout=5)
        self._local.close()

    # -- the connection ----------------------------------------------------------------------

    def _lease_loop(self) -> None:
        failures = 0
        while not self._stop.is_set():
            self.attempts += 1
            try:
                ws = Client.connect(self.socket_url, headers=dict(self._gateway.headers))
            except (HandshakeFailed, OSError) as exc:
                failures += 1
                delay = retry_delay(failures, self.retry_base, self.retry_cap)
                log.warning("cannot connect to %s: %s; retrying in %.1f s", self.socket_url, exc, delay)
                self._stop.wait(delay)
                continue
            self._ws = ws
            try:
                self._send({"type": "hello", **self._hello()})
                if failures:
                    log.info("connected to %s again", self.socket_url)
                failures = 0
                self._receive(ws)
            except ConnectionClosed:
                if not self._stop.is_set():
                    failures += 1
                    log.warning("the connection to %s closed", self.socket_url)
            finally:
                self._ws = None
                with contextlib.suppress(ConnectionClosed):
                    ws.close()
                self._drop_all("the connection closed: the gateway queues it again")
            if self.local_failures and not self._stop.is_set():  # the service is down: take no jobs for now
                self._stop.wait(retry_delay(self.local_failures, self.retry_base, self.retry_cap))
            elif failures and not self._stop.is_set():
                self._stop.wait(retry_delay(failures, self.retry_base, self.retry_cap))

    def _hello(self) -> dict[str, Any]:
        hello: dict[str, Any] = {"worker_id": self.worker_id, "max_jobs": self.max_jobs}
        if self.routes:
            hello["routes"] = self.routes
        if self.models:
            hello["models"] = self.models
        return hello

    def _receive(self, ws: Client) -> None:
        """Take the gateway's messages until the connection closes, or the service is found down."""
        down_before = self.local_failures
        while not self._stop.is_set():
            message = ws.receive(timeout=1)
            if self.local_failures > down_before:  # a job could not reach the service: hand the rest back, wait
                return
            if message is None:
                continue
            data = json.loads(message)
            kind = data.get("type")
            if kind == "task":
                self._take(data)
            elif kind == "cancel":
                with self._lock:
                    held = self.held.get(str(data.get("request_id")))
                if held is not None:
                    self._drop(held, "it was cancelled")
            elif kind == "error":
                log.error("the gateway says: %s", data.get("error"))

    def _send(self, message: dict[str, Any]) -> None:
        ws = self._ws
        if ws is None:
            raise ConnectionClosed()
        with self._send_lock:
            ws.send(json.dumps(message))

    # -- jobs ----------------------------------------------------------------------------------

    def _take(self, job: dict[str, Any]) -> None:
        held = Held(job)
        with self._lock:
            self.held[held.job_id] = held
        log.info("job %s pushed (attempt %s): %s %s", held.job_id, job.get("attempt"), *_line(job))
        threading.Thread(target=self._run_job, args=(held,), name=f"job-{held.job_id[:8]}", daemon=True).start()

    def _report(self, held: Held, action: str, body: dict[str, Any]) -> None:
        """Send the answer as a `result` message; a connection gone by now means the job was queued again."""
        error = None if action == "complete" else str(body.get("error", "failed"))[:MAX_ERROR_LENGTH]
        result = {key: body[key] for key in ("status", "headers", "body") if key in body} or None
        message: dict[str, Any] = {"type": "result", "request_id": held.job_id, "error": error, "result": result}
        if error is not None:
            message["retry"] = bool(body.get("retry"))
        try:
            self._send(message)
        except ConnectionClosed:
            log.warning("job %s: the connection closed before its answer went; it is queued again", held.job_id)
            return
        log.info("job %s: %s sent", held.job_id, action)

    def _drop_all(self, why: str) -> None:
        with self._lock:
            held = list(self.held.values())
        for job in held:
            self._drop(job, why)


def _line(job: dict[str, Any]) -> tuple[str, str]:
    return job["payload"]["method"], job["payload"]["target"]
