"""The tests' network guard: no connection leaves this machine, in the test run or the processes it starts.

An audit hook (PEP 578) sees every `socket.connect`, `connect_ex`, `sendto` and `sendmsg` at the
C level, whoever calls it: the standard library, requests, a pool thread of the health checker,
gevent's sockets (which call the real socket underneath). One aimed at an address outside
127.0.0.0/8 and ::1 is refused with `OffMachineConnection` (a ConnectionRefusedError, so the code
under test handles it as it would a refused connection) and recorded; unix sockets and the other
families pass. tests/conftest.py fails the test that recorded one.

Processes the tests start load this through tests/offline/sitecustomize.py: conftest puts that
folder on PYTHONPATH and names a file in GATEWAY_TEST_NETWORK_GUARD, where such a process writes
each connection it refused, one a line. Standard library only: it loads before anything else.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import sys
import threading
from typing import Any

ENV = "GATEWAY_TEST_NETWORK_GUARD"  # the file where guarded subprocesses write what they refused
GUARDED_EVENTS = frozenset({"socket.connect", "socket.sendto", "socket.sendmsg"})
NETWORK_FAMILIES = (socket.AF_INET, socket.AF_INET6)


class OffMachineConnection(ConnectionRefusedError):
    """A connection the tests' network guard refused: its address is not on this machine's loopback."""


violations: list[str] = []  # what this process refused, as "host:port (event)"
_installed = False
_to_file = False  # a process the tests started: write each one to the file GATEWAY_TEST_NETWORK_GUARD names
_log_lock = threading.Lock()


def is_loopback(host: str) -> bool:
    """True for an address in 127.0.0.0/8 or ::1 (an IPv4-mapped one too), or a name that resolves only there."""
    try:
        found = [ipaddress.ip_address(host.split("%")[0])]
    except ValueError:
        if host.rstrip(".").lower() == "localhost":
            return True
        try:
            found = [ipaddress.ip_address(str(info[4][0]).split("%")[0]) for info in socket.getaddrinfo(host, None)]
        except (OSError, UnicodeError, ValueError):
            return False
    for address in found:
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        if not address.is_loopback:
            return False
    return bool(found)


def _hook(event: str, args: tuple[Any, ...]) -> None:
    if event not in GUARDED_EVENTS:
        return
    sock, address = args[0], args[1]
    if getattr(sock, "family", None) not in NETWORK_FAMILIES or not isinstance(address, tuple) or not address:
        return  # a unix socket (its address is a path), netlink, or a sendmsg on a connected socket
    host = address[0]
    if isinstance(host, bytes):
        host = host.decode("ascii", "replace")
    if isinstance(host, str) and is_loopback(host):
        return
    where = f"{host}:{address[1]}" if len(address) > 1 else str(host)
    record(f"{where} ({event})")
    raise OffMachineConnection(f"the tests' network guard refused {event} to {where}: only loopback may be reached")


def record(what: str) -> None:
    """Keep a refused connection here, and in the shared file when this is a process the tests started."""
    violations.append(what)
    path = os.environ.get(ENV)
    if _to_file and path:
        line = f"pid {os.getpid()} {' '.join(sys.argv[:3])[:200]}: {what}\n"
        with _log_lock, open(path, "a", encoding="utf-8") as log:
            log.write(line)


_shared_log: str | None = None


def guard_children(folder: str) -> str:
    """Make the Python processes started from here load the guard (from `folder`); the file they report to.

    Once per process, however often it is called (conftest may be imported under two names).
    """
    global _shared_log
    if _shared_log is None:
        import atexit
        import tempfile

        fd, _shared_log = tempfile.mkstemp(prefix="gateway-tests-network-guard-", suffix=".log")
        os.close(fd)
        atexit.register(os.unlink, _shared_log)
        os.environ[ENV] = _shared_log
        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [folder, os.environ.get("PYTHONPATH")]))
    return _shared_log


def install(to_file: bool = True) -> None:
    """Add the audit hook, once per process (an audit hook cannot be taken away).

    `to_file`: also write what it refuses to the file named by GATEWAY_TEST_NETWORK_GUARD, as a
    process the tests started does; the test run itself reads `violations`.
    """
    global _installed, _to_file
    _to_file = to_file
    if not _installed:
        sys.addaudithook(_hook)
        _installed = True
