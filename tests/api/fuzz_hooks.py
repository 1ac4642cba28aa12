"""schemathesis hooks for test_openapi_fuzz.py: nothing it sends makes the gateway look up a name in DNS.

The gateway resolves a DNS name it is asked to register (`ip`, or `monitor_url`'s host) to check
the address, which would send a query to the resolver. Names become `localhost`, which the hosts
file answers; the gateway runs with ALLOWED_BACKEND_NETWORKS on loopback, so every address it
accepts, and then checks and proxies to, is on this machine.
"""

from __future__ import annotations

import ipaddress
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import schemathesis

from gateway.fleet.addresses import HOSTNAME_PATTERN

LOOPBACK_NAME = "localhost"


def would_resolve(host: str) -> bool:
    """True for a host the gateway would look up: a DNS name, not an IP address literal."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return HOSTNAME_PATTERN.fullmatch(host) is not None
    return False


def local_url(url: str) -> str:
    """`url` with a DNS name for its host replaced by localhost; anything unparsable as it is."""
    try:
        parts = urlsplit(url)
        host, port = parts.hostname, parts.port
    except ValueError:
        return url
    if not host or not would_resolve(host):
        return url
    netloc = LOOPBACK_NAME if port is None else f"{LOOPBACK_NAME}:{port}"
    return urlunsplit(parts._replace(netloc=netloc))


@schemathesis.hook
def before_call(context: Any, case: Any, kwargs: dict[str, Any]) -> None:
    """Point every name a registration body carries at localhost."""
    body = case.body
    if not isinstance(body, dict):
        return
    if isinstance(body.get("ip"), str) and would_resolve(body["ip"]):
        body["ip"] = LOOPBACK_NAME
    if isinstance(body.get("monitor_url"), str):
        body["monitor_url"] = local_url(body["monitor_url"])
