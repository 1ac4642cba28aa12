"""Seed 004's channel: `GET /workers/ws`, a WebSocket on which the gateway pushes jobs to a worker.

The worker says who it is and what it serves in its first message; the gateway then sends it
jobs in seed 004's envelope as they are queued, up to its `max_jobs` at a time, and the worker
answers each with `{"type": "result", "request_id", "error", "result"}`. The lease rules are
the HTTP pull's: while the connection is open, the gateway renews the leases of the jobs it
holds; a cancelled job is told to the worker (`{"type": "cancel", "request_id"}`); and a worker
that disconnects has its unfinished jobs queued again, each attempt counted.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import threading
from typing import Any

from flask import Blueprint, Flask, Response, current_app, request
from marshmallow import ValidationError
from simple_websocket import ConnectionClosed, Server

from gateway.api.auth import worker_authorized, worker_refusal
from gateway.api.jobs import jobs
from gateway.api.schemas import LeaseSchema
from gateway.api.workers import answer_limit, envelope
from gateway.cluster.connection import RedisUnavailable
from gateway.config import Config
from gateway.errors import error_response
from gateway.jobs.records import CANCELLED, JobError, JobResult
from gateway.jobs.service import JobService
from gateway.jobs.workers import LeaseAsk, TooManyPolls

log = logging.getLogger(__name__)
bp = Blueprint("worker_socket", __name__)
HELLO_SECONDS = 10.0  # a worker must say who it is this soon after it connects
POLICY_VIOLATION = 1008  # the WebSocket close code for a message that breaks the protocol


class Closed(Response):
    """What the WSGI server gets once the socket is done: nothing more may be written on it."""

    def __init__(self, mode: str) -> None:
        super().__init__()
        self.mode = mode

    def __call__(self, environ: Any, start_response: Any) -> Any:
        if self.mode == "gunicorn":
            raise StopIteration  # gunicorn's way to end a connection with no response written
        if self.mode == "werkzeug":
            raise ConnectionError  # werkzeug's server drops the connection quietly
        return []


class WorkerSession:
    """One connected worker: a sender that leases and pushes jobs, and this loop that reads answers."""

    def __init__(self, ws: Server, service: JobService, ask: LeaseAsk, lease_seconds: float) -> None:
        self.ws = ws
        self.service = service
        self.ask = ask
        self.lease_seconds = lease_seconds
        self.held: dict[str, str] = {}  # job id -> lease token, for the jobs this worker has now
        self.lock = threading.Lock()
        self.room = threading.Event()  # set when a job ends, so the sender may lease another
        self.closed = threading.Event()

    def run(self) -> None:
        sender = threading.Thread(target=self.send_jobs, name=f"ws-{self.ask.worker_id}", daemon=True)
        sender.start()
        try:
            while True:
                message = self.ws.receive()
                if message is None:
                    continue
                self.on_message(message)
        except ConnectionClosed:
            pass
        finally:
            self.closed.set()
            self.room.set()
            sender.join(timeout=self.lease_seconds)
            self.release_all()

    # -- the sender ------------------------------------------------------------------------

    def send_jobs(self) -> None:
        """Lease jobs while there is room and push them; renew the leases held every lease/3."""
        renew_every = self.lease_seconds / 3
        while not self.closed.is_set():
            with self.lock:
                room = self.ask.max_jobs - len(self.held)
            if room <= 0:
                self.room.wait(renew_every)
                self.room.clear()
                self.renew()
                continue
            try:
                ask = LeaseAsk(self.ask.worker_id, self.ask.routes, self.ask.models, room)
                leased = self.service.lease(ask, renew_every, gone=self.closed.is_set)
            except (TooManyPolls, RedisUnavailable):  # Redis's outage is logged once, by Redis.call
                leased = []
                self.closed.wait(1)
            for job in leased:
                assert job.lease_token is not None  # a leased job always has one
                with self.lock:
                    self.held[job.job_id] = job.lease_token  # before the send: a failed send still releases it
                try:
                    self.ws.send(json.dumps(envelope(job)))
                except ConnectionClosed:
                    return
            self.renew()

    def renew(self) -> None:
        """Extend every held job's lease; tell the worker of a job cancelled meanwhile."""
        with self.lock:
            held = list(self.held.items())
        for job_id, token in held:
            try:
                job = self.service.heartbeat(job_id, token)
            except JobError:  # its lease moved on (it ran out while the connection stalled)
                self.forget(job_id)
                continue
            except RedisUnavailable:  # the next renewal tries again, within the lease
                return
            if job.status == CANCELLED:
                self.forget(job_id)
                try:
                    self.ws.send(json.dumps({"type": "cancel", "request_id": job_id}))
                except ConnectionClosed:
                    return

    def forget(self, job_id: str) -> str | None:
        with self.lock:
            token = self.held.pop(job_id, None)
        self.room.set()
        return token

    # -- what the worker says --------------------------------------------------------------

    def on_message(self, message: str | bytes) -> None:
        """A result for a job this worker holds; anything else is refused with an error message."""
        try:
            try:
                data = json.loads(message)
            except ValueError:
                raise ValueError("a message must be JSON") from None
            if not isinstance(data, dict) or data.get("type") != "result":
                raise ValueError('expected {"type": "result", "request_id": ..., "error": ..., "result": ...}')
            job_id = str(data.get("request_id"))
            with self.lock:
                token = self.held.get(job_id)
            if token is None:
                raise ValueError(f"request {job_id} is not one this worker holds (cancelled, or its lease moved on)")
            error = data.get("error")
            if error is not None:
                self.forget(job_id)
                self.service.fail(
                    job_id, token, f"worker {self.ask.worker_id}: {error}"[:1000], bool(data.get("retry"))
                )
                return
            result = parse_result(data.get("result"))
            self.forget(job_id)
            self.service.complete(job_id, token, result)
        except (ValueError, JobError, RedisUnavailable) as exc:  # Redis away: not stored, the lease runs out
            self.ws.send(json.dumps({"type": "error", "error": str(exc)}))

    def release_all(self) -> None:
        """The worker left: every job it still held goes back to the queue, its attempt counted."""
        with self.lock:
            held, self.held = self.held, {}
        for job_id, token in held.items():
            try:
                self.service.fail(job_id, token, f"worker {self.ask.worker_id} disconnected", retry=True)
            except (JobError, RedisUnavailable):  # Redis away: its lease runs out instead
                continue
            log.warning("job %s: worker %s disconnected while it ran; queued again", job_id, self.ask.worker_id)


def parse_result(result: Any) -> JobResult:
    """`{"status", "headers", "body"}` (the body in base64), as HTTP's complete takes it; ValueError if not."""
    if not isinstance(result, dict):
        raise ValueError("result must be an object with status, headers and body")
    status, headers, body = result.get("status"), result.get("headers", []), result.get("body", "")
    if not isinstance(status, int) or isinstance(status, bool) or not 100 <= status <= 599:
        raise ValueError("result.status must be an HTTP status, 100 to 599")
    if isinstance(headers, dict):
        headers = list(headers.items())
    pairs = []
    for pair in headers if isinstance(headers, list) else [None]:
        if not (isinstance(pair, list | tuple) and len(pair) == 2 and all(isinstance(p, str) for p in pair)):
            raise ValueError("result.headers must be [name, value] pairs of strings")
        if any(c in pair[0] + pair[1] for c in "\r\n\0"):
            raise ValueError("result.headers may not hold CR, LF or NUL")
        pairs.append((pair[0], pair[1]))
    if not isinstance(body, str):
        raise ValueError("result.body must be base64 text")
    try:
        raw = base64.b64decode(body, validate=True)
    except binascii.Error:
        raise ValueError("result.body is not valid base64") from None
    return JobResult(status, tuple(pairs), raw)


@bp.get("/workers/ws", websocket=True)  # werkzeug matches an Upgrade: websocket request only to such a rule
@bp.get("/workers/ws", endpoint="worker_socket_plain")  # and a plain GET only to this one: a 400 that says why
def worker_socket() -> Response:
    """A WebSocket on which jobs are pushed to a worker as they are queued, and answered."""
    if not worker_authorized():
        return worker_refusal()
    if request.headers.get("Upgrade", "").lower() != "websocket":
        return error_response(
            400, "this is a WebSocket: connect with Upgrade: websocket (the HTTP pull is POST /workers/lease)"
        )
    config: Config = current_app.config["GATEWAY"]
    ws = Server.accept(request.environ, max_message_size=answer_limit(), ping_interval=config.job_lease_seconds / 3)
    try:
        ask = hello(ws, config)
    except (ConnectionClosed, ValueError) as exc:
        if not isinstance(exc, ConnectionClosed):
            with_reason(ws, str(exc))
        return Closed(ws.mode)
    log.info("worker %s connected over WebSocket", ask.worker_id)
    WorkerSession(ws, jobs(), ask, config.job_lease_seconds).run()
    log.info("worker %s disconnected", ask.worker_id)
    with_reason(ws, None)
    return Closed(ws.mode)


def hello(ws: Server, config: Config) -> LeaseAsk:
    """The worker's first message: {"type": "hello", "worker_id", "routes" or "models", "max_jobs"}."""
    message = ws.receive(timeout=HELLO_SECONDS)
    if message is None:
        raise ValueError(f'say hello within {HELLO_SECONDS:g} s: {{"type": "hello", "worker_id": ...}}')
    try:
        data = json.loads(message)
    except ValueError:
        raise ValueError('the first message must be JSON: {"type": "hello", "worker_id": ...}') from None
    if not isinstance(data, dict) or data.pop("type", None) != "hello":
        raise ValueError('the first message must be {"type": "hello", "worker_id": ..., "routes" or "models": [...]}')
    try:
        fields = LeaseSchema(prefixes=config.proxy_prefixes).load(data)
    except ValidationError as exc:
        raise ValueError(f"hello: {exc.messages}") from None
    return LeaseAsk(fields["worker_id"], fields["routes"], fields["models"], fields["max_jobs"])


def with_reason(ws: Server, reason: str | None) -> None:
    """Close the socket, with an error message and code 1008 first when there is a reason."""
    try:
        if reason is not None:
            ws.send(json.dumps({"type": "error", "error": reason}))
            ws.close(POLICY_VIOLATION, reason[:120])
        else:
            ws.close()
    except ConnectionClosed:
        pass


def init_app(app: Flask) -> None:
    app.register_blueprint(bp)
