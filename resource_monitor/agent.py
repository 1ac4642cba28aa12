"""The host agent: keeps this host's GPU service registered with the gateway while the monitor runs."""

from __future__ import annotations

import contextlib
import logging
import os
import random
import socket
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
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


def read_token(path: Path) -> str | None:
    """The server token kept in `path`, or None when there is none (or it cannot be read, which is logged)."""
    try:
        token = path.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        log.warning("cannot read the server token file %s: %s; registering without it", path, exc)
        return None
    return token or None


def write_token(path: Path, token: str) -> None:
    """Keep `token` in `path`, readable by this user only (0600): a temp file beside it, fsync, rename."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd, temp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)  # mode 0600
    try:
        with os.fdopen(fd, "w", encoding="ascii") as handle:
            handle.write(token + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp_name, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp_name)
        raise


class Refused(Exception):
    """The gateway answered, but will not accept this registration as it stands (wrong secret, bad field)."""


class RegistrationAgent:
    """Registers the host at start, again every `heartbeat` seconds, and unregisters on stop().

    With a gateway that binds ids to tokens (REGISTRATION_BINDING=token), the token the first
    registration gets is kept in `token_file` (in memory only when it is None) and sent with
    every later call.
    """

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
        token_file: str | os.PathLike[str] | None = None,
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
        self.token_file = Path(token_file) if token_file is not None else None
        self._token = read_token(self.token_file) if self.token_file is not None else None
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

    def _keep_token(self, token: str) -> None:
        """Hold on to the token the gateway bound this id to, in the token file when there is one."""
        self._token = token
        if self.token_file is None:
            return
        try:
            write_token(self.token_file, token)
        except OSError as exc:
            log.error(
                "cannot save the server token of %s to %s: %s; kept in memory only",
                self.server_id,
                self.token_file,
                exc,
            )
            return
        log.info("the gateway bound %s to a server token; saved it in %s", self.server_id, self.token_file)

    def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        headers = {"X-Server-Token": self._token} if self._token else None
        # No redirects: the secret header would follow one to another host.
        response = self._session.post(
            self.gateway_url + path, json=body, headers=headers, timeout=REQUEST_TIMEOUT, allow_redirects=False
        )
        reply = gateway_reply(response, "--register-to")
        if isinstance(reply.get("server_token"), str):
            self._keep_token(reply["server_token"])
        return reply


def gateway_reply(response: requests.Response, flag: str) -> dict[str, Any]:
    """The gateway's JSON reply; Refused for what retrying will not mend, HTTPError for what it may.

    `flag` is the option that named the gateway, for a message that says to check it.
    """
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
        message += f" (redirects to {response.headers.get('Location')}; use that as {flag})"
    elif response.ok:
        message += f" (not the gateway's reply; check {flag})"
    if status >= 500 or status in (408, 429):  # the gateway is busy or in trouble: worth a quick retry
        raise requests.HTTPError(message, response=response)
    raise Refused(message)
