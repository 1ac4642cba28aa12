"""The host agent: keeps this host's GPU service registered with the gateway while the monitor runs."""

from __future__ import annotations

import logging
import random
import socket
import threading
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import requests

log = logging.getLogger(__name__)

RETRY_BASE = 1.0  # seconds before the first retry; doubles with each failure in a row
RETRY_CAP = 30.0  # the longest wait between attempts
REQUEST_TIMEOUT = 5.0


def retry_delay(
    failures: int, base: float = RETRY_BASE, cap: float = RETRY_CAP, rng: Callable[[], float] = random.random
) -> float:
    """Seconds to wait after `failures` failures in a row: base doubling up to cap, less up to half
    at random, so hosts that lost the gateway together do not come back in step."""
    ceiling = min(cap, base * 2 ** min(max(failures - 1, 0), 32))
    return ceiling * (1 - rng() / 2)


def detect_advertise_ip(gateway_url: str) -> str:
    """The address of the local interface that routes to the gateway (no packet is sent)."""
    parts = urlsplit(gateway_url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    family, kind, proto, _, address = socket.getaddrinfo(parts.hostname, port, type=socket.SOCK_DGRAM)[0]
    with socket.socket(family, kind, proto) as sock:
        sock.connect(address)  # UDP: only picks the route and the source address
        return str(sock.getsockname()[0])


class Refused(Exception):
    """The gateway answered, but will not accept this registration as it stands (wrong secret, bad field)."""


class RegistrationAgent:
    """Registers the host at start, again every `heartbeat` seconds, and unregisters on stop()."""

    def __init__(
        self,
        gateway_url: str,
        secret: str,
        server_id: str,
        service_port: int,
        monitor_port: int,
        advertise_ip: str | None = None,
        heartbeat: float = 30.0,
        retry_base: float = RETRY_BASE,
        retry_cap: float = RETRY_CAP,
    ) -> None:
        self.gateway_url = gateway_url.rstrip("/")
        self.server_id = server_id
        self.service_port = service_port
        self.monitor_port = monitor_port
        self.advertise_ip = advertise_ip  # None: detect before every attempt, so a new address is sent
        self.heartbeat = heartbeat
        self.retry_base = retry_base
        self.retry_cap = retry_cap
        self.registered = threading.Event()  # set once the gateway has accepted
        self.attempts = 0
        self._stop = threading.Event()
        self._session = requests.Session()
        self._session.headers["X-Webhook-Secret"] = secret
        self._thread = threading.Thread(target=self._run, name=f"register-{server_id}", daemon=True)

    def start(self) -> None:
        """Register now and keep registering, on a thread of its own."""
        self._thread.start()

    def stop(self, unregister: bool = True) -> None:
        """Stop the heartbeat; then, once no registration is in flight, unregister."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=2 * REQUEST_TIMEOUT)
        if unregister:
            self.unregister()
        self._session.close()

    def _run(self) -> None:
        failures = 0
        while not self._stop.is_set():
            self.attempts += 1
            try:
                self.register()
            except Refused as exc:
                failures += 1
                delay = self.retry_cap  # an operator must act; ask again, but not often
                log.error("the gateway refused to register %s: %s; retrying in %.0f s", self.server_id, exc, delay)
            except (requests.RequestException, OSError) as exc:
                failures += 1
                delay = retry_delay(failures, self.retry_base, self.retry_cap)
                log.warning(
                    "cannot register %s with %s: %s; retrying in %.1f s", self.server_id, self.gateway_url, exc, delay
                )
            else:
                if failures or not self.registered.is_set():
                    log.info("registered %s with %s", self.server_id, self.gateway_url)
                failures = 0
                self.registered.set()
                delay = self.heartbeat
            self._stop.wait(delay)

    def register(self) -> dict[str, Any]:
        """One registration attempt; the gateway's reply, or Refused / a requests or socket error."""
        ip = self.advertise_ip or detect_advertise_ip(self.gateway_url)
        body = {"server_id": self.server_id, "ip": ip, "port": self.service_port, "monitor_port": self.monitor_port}
        return self._post("/webhook/register", body)

    def unregister(self) -> bool:
        """One attempt to leave the fleet; False (logged) when it did not work."""
        try:
            self._post("/webhook/unregister", {"server_id": self.server_id})
        except (Refused, requests.RequestException) as exc:
            log.warning("cannot unregister %s from %s: %s", self.server_id, self.gateway_url, exc)
            return False
        log.info("unregistered %s from %s", self.server_id, self.gateway_url)
        return True

    def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        # No redirects: the secret header would follow one to another host.
        response = self._session.post(
            self.gateway_url + path, json=body, timeout=REQUEST_TIMEOUT, allow_redirects=False
        )
        try:
            reply = response.json()
        except ValueError:
            reply = None
        if not isinstance(reply, dict):
            reply = {}
        if response.ok and reply.get("success") is True:
            return reply
        status = response.status_code
        message = f"error {status}: {reply.get('message') or response.reason}"
        if reply.get("errors"):
            message += f" {reply['errors']}"
        if response.is_redirect:
            message += f" (redirects to {response.headers.get('Location')}; use that as --register-to)"
        elif response.ok:
            message += " (not the gateway's reply; check --register-to)"
        if status >= 500 or status in (408, 429):  # the gateway is busy or in trouble: worth a quick retry
            raise requests.HTTPError(message, response=response)
        raise Refused(message)
