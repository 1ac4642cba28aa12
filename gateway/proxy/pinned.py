"""Requests that must go to one server: a task's to its owner, an allocated key's to the key's server."""

from __future__ import annotations

import logging
import sqlite3
from typing import TYPE_CHECKING

from flask import Response

from gateway.allocations.records import AllocationError, key_problem
from gateway.cluster.connection import RedisUnavailable
from gateway.config import Config
from gateway.errors import error_response
from gateway.manager import BackendManager
from gateway.proxy.current_request import request
from gateway.proxy.exchange import Answer, Body, Exchange, UpstreamFailed, overloaded, payload, upstream_error
from gateway.routing.admission import Lease
from gateway.routing.affinity import FALLBACK_OWNER

if TYPE_CHECKING:
    from gateway.allocations.service import AllocationService

log = logging.getLogger("gateway.proxy.handler")  # the proxy's lines keep the handler's name

ALLOCATION_HEADER = "X-Allocation-Key"  # requests with an allocated key go to its server (docs/allocations.md)


class PinnedForwarding:
    """Sends a request to the one server that must take it, cap or not, and nowhere else: no failover."""

    def __init__(self, config: Config, manager: BackendManager, exchange: Exchange, retry_after: str) -> None:
        self.config = config
        self.manager = manager
        self.exchange = exchange
        self.retry_after = retry_after
        self.allocations: AllocationService | None = None  # set by the allocations API: X-Allocation-Key

    def forward_owned(self, task_id: str, owner: str, target: str, body: bytes, headers: dict[str, str]) -> Answer:
        """Send a request that names a task to the server that owns it, and nowhere else."""
        if owner == FALLBACK_OWNER:
            if not self.config.backend_api_base:
                return self.unavailable(f"task {task_id} belongs to the fallback backend, which is not configured")
            return self.exchange.forward_to(
                self.config.backend_api_base, FALLBACK_OWNER, target, body, headers, task_id
            )
        return self.forward_pinned(owner, f"which owns task {task_id}", target, body, headers, task_id)

    def forward_allocated(
        self, target: str, body: Body, headers: dict[str, str], model: str | None = None
    ) -> Answer | None:
        """Send a request with an allocated X-Allocation-Key to the key's server, and nowhere else.

        None when it has no key, or a key with no allocation: it is routed as any request. With
        `model` (an LLM route's), the server must be one routing by model could pick for it, or a 409.
        """
        key = request.headers.get(ALLOCATION_HEADER)
        if not key or self.allocations is None:
            return None
        problem = key_problem(key)
        if problem is not None:
            return error_response(400, f"{ALLOCATION_HEADER}: {problem}")
        try:
            routed = self.allocations.route(key)
        except AllocationError as exc:  # its server is gone and no other could take it, or the move was refused
            return self.unavailable(f"allocation {key}: {exc.message}")
        except (sqlite3.Error, RedisUnavailable) as exc:
            log.error("could not look up allocation %s (%s): routed as any request", key, exc)
            return None
        if routed.refusal is not None:
            return self.unavailable(routed.refusal)
        if routed.server_id is None:
            return None
        server_id, actual_model = routed.server_id, None
        if model is not None:
            actual_model = self.manager.model_name_on(server_id, model)
            if actual_model is None:  # never silently elsewhere: the key's state is on its server
                message = f"allocation {key} is on server {server_id}, which does not serve model {model!r}"
                return error_response(409, message)
        sent = payload(body, Lease(None, None, actual_model))  # a model_map name renamed for that server
        return self.forward_pinned(server_id, f"which holds allocation {key}", target, sent, headers)

    def forward_pinned(
        self, owner: str, whose: str, target: str, body: bytes, headers: dict[str, str], known_task: str = ""
    ) -> Answer:
        """Send a request to the one server that must take it (`whose` says why), cap or not, and nowhere else."""
        lease = self.manager.hold(owner)  # a drained or capped owner still serves its own tasks
        server = lease.server
        if server is None or not server.is_healthy:
            lease.release()
            state = "is no longer registered" if server is None else "is unhealthy"
            return self.unavailable(f"server {owner}, {whose}, {state}")
        try:
            upstream, in_flight = self.exchange.send(server.url, owner, target, body, headers)
        except UpstreamFailed as exc:
            lease.release()
            if exc.local:
                return overloaded(exc)
            if exc.sent:
                return upstream_error(owner, exc)
            self.manager.report_failure(owner, server.url, str(exc))
            return self.unavailable(f"server {owner}, {whose}, is unreachable: {exc}")
        except BaseException:
            lease.release()
            raise
        return self.exchange.respond(
            upstream, in_flight, owner, server.url, known_task=known_task, release=lease.release
        )

    def unavailable(self, message: str) -> Response:
        """503 with Retry-After."""
        return error_response(503, message, headers={"Retry-After": self.retry_after})
