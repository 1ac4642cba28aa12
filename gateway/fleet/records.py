"""How a server's record changes: a registration, a check result. Pure rules; the caller holds the lock."""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any, NamedTuple

from gateway.fleet.health import HealthResult
from gateway.fleet.server import OPTION_NAMES, BackendServer, now_iso
from gateway.fleet.tokens import new_token, token_hash, token_matches

log = logging.getLogger("gateway.manager")  # a registration's lines keep the manager's name
health_log = logging.getLogger("gateway.health")


class Transition(NamedTuple):
    """A check result worth logging: `healthy` is True or False when health changed, None otherwise."""

    server_id: str
    healthy: bool | None
    detail: str
    first: bool = False  # marked unhealthy by the first failed check of a server that never passed one


class FleetFull(RuntimeError):
    """A new server would take the fleet past its limit."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"the fleet is full: {limit} servers are registered")
        self.limit = limit


class TokenRefused(PermissionError):
    """A server bound to a token was registered or unregistered without it (`missing`) or with another."""

    def __init__(self, server_id: str, missing: bool) -> None:
        super().__init__(f"server {server_id}: {'no' if missing else 'a wrong'} server token")
        self.server_id, self.missing = server_id, missing


class Registrant(NamedTuple):
    """Who registers, and the rules the registration is held to."""

    operator: bool = False  # through /admin: the options it sets are the operator's, and registrations keep them
    max_servers: int = 0  # a new id past this many servers is refused; 0: no limit
    binding: bool = False  # REGISTRATION_BINDING=token: a bound id needs its token, an unbound one gets one
    server_token: str | None = None  # the token the registrant presented


def admit(existing: BackendServer | None, registrant: Registrant, count: int) -> None:
    """Raise FleetFull or TokenRefused when a registration may not be made; `count` is the fleet's size."""
    if existing is None and registrant.max_servers and count >= registrant.max_servers:
        raise FleetFull(registrant.max_servers)
    if existing is not None:
        check_token(existing, registrant)


def check_token(existing: BackendServer, registrant: Registrant) -> None:
    """Raise TokenRefused unless the registrant may change `existing`: its token, when binding holds it to one."""
    if not registrant.binding or registrant.operator or existing.token_hash is None:
        return
    if not token_matches(registrant.server_token, existing.token_hash):
        raise TokenRefused(existing.server_id, missing=registrant.server_token is None)


class Registration(NamedTuple):
    """What a registration did: the server as it is now, whether it is new, and the options it left."""

    server: BackendServer
    created: bool
    kept_by_operator: list[str]  # options it named that stay as the operator set them
    server_token: str | None = None  # the token it bound the id to, to be shown once


class Claim(NamedTuple):
    """What a registration changes in a record, the options it leaves to the operator, and a token it binds."""

    changes: dict[str, Any]
    kept_by_operator: list[str]
    server_token: str | None


def claimed(existing: BackendServer | None, options: dict[str, Any], registrant: Registrant) -> Claim:
    """What `registrant`'s registration with `options` changes in the record `existing` (None: a new one)."""
    if registrant.operator:
        return Claim({**options, "operator_options": held_by_operator(existing, options)}, [], None)
    kept = [name for name in options if existing is not None and name in existing.operator_options]
    changes = {name: value for name, value in options.items() if name not in kept}
    token = None
    if registrant.binding and (existing is None or existing.token_hash is None):  # it binds the id
        token = new_token()
        changes["token_hash"] = token_hash(token)
    return Claim(changes, kept, token)


def held_by_operator(existing: BackendServer | None, options: dict[str, Any]) -> list[str]:
    """The options the operator holds once it has set `options` too."""
    held = set(options) | set(existing.operator_options if existing is not None else ())
    return [name for name in OPTION_NAMES if name in held]


def checked_options(options: dict[str, Any]) -> dict[str, Any]:
    """A copy of `options`; ValueError when one is not a server option."""
    unknown = set(options) - set(OPTION_NAMES)
    if unknown:
        raise ValueError(f"unknown server options: {', '.join(sorted(unknown))}")
    return dict(options)


def holds(server: BackendServer, values: dict[str, Any]) -> bool:
    """True when the server already holds every given value."""
    return all(getattr(server, name) == value for name, value in values.items())


def address(server: BackendServer) -> tuple[str, int, str | None]:
    """Where the server is reached: ip, port and monitor URL."""
    return server.ip, server.port, server.monitor_url


def declares(server: BackendServer) -> bool:
    """True when the server registered its models, so discovery leaves it alone."""
    return bool(server.models or server.model_map)


def registered(
    existing: BackendServer | None, server_id: str, ip: str, port: int, monitor_url: str | None, options: dict[str, Any]
) -> BackendServer:
    """The record a registration leaves: at the same address health is kept, at a new one it starts afresh."""
    if existing is not None and address(existing) == (ip, port, monitor_url):
        return replace(existing, **options)  # new options at the same address: health is kept
    server = BackendServer(
        server_id=server_id, ip=ip, port=port, monitor_url=monitor_url, health_changed_time=now_iso()
    )
    if existing is not None:  # a move keeps what the operator and the sweeps set
        server = replace(
            server,
            **existing.options(),
            draining=existing.draining,
            operator_options=existing.operator_options,
            token_hash=existing.token_hash,
        )
        server.last_used_time = existing.last_used_time
        server.discovered_models = existing.discovered_models
    return replace(server, **options)


def log_registration(existing: BackendServer | None, server: BackendServer, claim: Claim) -> None:
    """Write what a registration that changed the record did (never a token or its hash)."""
    server_id, applied = server.server_id, {k: v for k, v in claim.changes.items() if k in OPTION_NAMES}
    if claim.server_token is not None:
        log.info("server %s is bound to a new server token", server_id)
    if existing is None:
        log.info("registered server %s at %s", server_id, server.url)
    elif address(existing) == address(server):
        log.info("server %s registered with new options: %s", server_id, applied)
    elif existing.url != server.url:
        log.info("server %s moved from %s to %s; health reset", server_id, existing.url, server.url)
    else:
        log.info("server %s now has monitor %s; health reset", server_id, server.monitor_url)


def has_passed(server: BackendServer) -> bool:
    """True once the server has passed a health check at its address (since it registered or moved).

    Derived, not stored: a registration or a move starts a record with no `last_check_time`; a
    check stamps it; and a server that has never passed is marked unhealthy by its first failed
    check, so it is healthy again only once a check passes. A healthy record that has been
    checked has therefore passed a check.
    """
    return server.is_healthy and server.last_check_time is not None


def count_check(
    server: BackendServer, result: HealthResult, threshold: int, now: str, checked: bool
) -> Transition | None:
    """Count a check result on the record, as HAProxy's `rise 1` and `fall` do.

    A success heals the server and resets its count; `threshold` failures in a row mark it
    unhealthy. A server that has never passed a check (it just registered or moved) is marked
    unhealthy by its first failed check: the count starts at its first success. A failed proxied
    request (`checked` False) counts towards the threshold only: one bad answer is no verdict on
    a server the registration's check is about to judge. Only a health check stamps `last_check_time`.
    """
    passed = has_passed(server)
    if checked:
        server.last_check_time = now
    was_healthy, old_fails = server.is_healthy, server.fail_count
    server.last_error = None if result.ok else result.detail
    if result.ok:
        server.fail_count = 0
        server.is_healthy = True
    else:
        server.fail_count += 1
        if server.fail_count >= threshold or (checked and not passed):
            server.is_healthy = False
    if server.is_healthy != was_healthy:
        server.health_changed_time = now
        first = not server.is_healthy and server.fail_count < threshold  # out before the threshold: never passed
        return Transition(server.server_id, server.is_healthy, result.detail, first)
    if server.is_healthy and server.fail_count != old_fails:
        return Transition(server.server_id, None, result.detail)
    return None


def log_transitions(transitions: list[Transition], threshold: int) -> None:
    """Write each transition to the health log."""
    for server_id, healthy, detail, first in transitions:
        if healthy is True:
            health_log.info("server %s recovered: %s", server_id, detail)
        elif healthy is False and first:
            health_log.warning(
                "server %s marked unhealthy by its first failed check (it never passed one): %s", server_id, detail
            )
        elif healthy is False:
            health_log.warning("server %s marked unhealthy after %d failures: %s", server_id, threshold, detail)
        else:
            health_log.info("server %s health check: %s", server_id, detail)
