"""The dashboard's logins: which are live, their CSRF tokens, and the cookie session opened only under /dashboard."""

from __future__ import annotations

import hmac
import secrets
import threading
import time
from collections.abc import Callable
from datetime import timedelta

from flask import Flask, Request
from flask.sessions import SecureCookieSession, SecureCookieSessionInterface

PREFIX = "/dashboard"


class LiveSessions:
    """The logins not yet ended, each with the time it expires; a cookie only names one of them."""

    def __init__(self, lifetime: timedelta, clock: Callable[[], float] = time.monotonic) -> None:
        self.lifetime = lifetime.total_seconds()
        self.clock = clock
        self._lock = threading.Lock()
        self._expiry: dict[str, float] = {}
        self._csrf_key = secrets.token_bytes(32)  # this process's: a restart, which ends every login, changes it

    def start(self) -> str:
        """Begin a login and return its id, forgetting those that have expired."""
        session_id, now = secrets.token_urlsafe(32), self.clock()
        with self._lock:
            self._expiry = {key: expiry for key, expiry in self._expiry.items() if expiry > now}
            self._expiry[session_id] = now + self.lifetime
        return session_id

    def alive(self, session_id: object) -> bool:
        """Whether `session_id` names a login that was neither ended nor has expired."""
        if not isinstance(session_id, str):
            return False
        with self._lock:
            expiry = self._expiry.get(session_id)
        return expiry is not None and self.clock() < expiry

    def end(self, session_id: object) -> None:
        """End a login (logout); an unknown or missing id is no error."""
        if isinstance(session_id, str):
            with self._lock:
                self._expiry.pop(session_id, None)

    def csrf_token(self, session_id: str) -> str:
        """The login's token for X-CSRF-Token: another site can send the cookie's login, never read this."""
        return hmac.new(self._csrf_key, session_id.encode(), "sha256").hexdigest()

    def csrf_matches(self, session_id: object, presented: str | None) -> bool:
        """Whether `presented` is the token of the live login `session_id`, compared in constant time."""
        if not isinstance(session_id, str) or presented is None or not self.alive(session_id):
            return False
        expected = self.csrf_token(session_id)
        return hmac.compare_digest(presented.encode("utf-8", "surrogatepass"), expected.encode())


class DashboardSessions(SecureCookieSessionInterface):
    """The signed-cookie session, opened only under /dashboard: no other route reads it, and
    opening it (cookie parsing, a signer) cost about 5% of a proxied request's CPU."""

    def open_session(self, app: Flask, request: Request) -> SecureCookieSession | None:
        if not request.path.startswith(PREFIX):
            return None  # Flask then uses a null session, which is never saved
        return super().open_session(app, request)
