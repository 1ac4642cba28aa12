"""Which ids and addresses a server may have: the rules registrations and the state file are held to."""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Sequence
from typing import NamedTuple
from urllib.parse import urlsplit

SERVER_ID_PATTERN = re.compile(r"\A[A-Za-z0-9_.-]{1,64}\Z")
# RFC 1123 host names: labels of 1-63 letters, digits and inner hyphens, 253 characters in all.
HOSTNAME_PATTERN = re.compile(r"(?=.{1,253}\.?$)(?!-)[A-Za-z0-9-]{1,63}(?<!-)(\.(?!-)[A-Za-z0-9-]{1,63}(?<!-))*\.?")

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

# A cloud metadata service (169.254.169.254, and those outside the link-local range: AWS's IPv6
# fd00:ec2::254, Alibaba's, Azure's WireServer, Oracle's) must never become a backend, nor may
# "this host", broadcast or a multicast group.
BLOCKED_NETWORKS: tuple[Network, ...] = tuple(
    ipaddress.ip_network(net)
    for net in (
        "0.0.0.0/8",
        "169.254.0.0/16",
        "100.100.100.200/32",  # Alibaba Cloud's metadata service
        "224.0.0.0/4",
        "255.255.255.255/32",
        "fe80::/10",
        "ff00::/8",
        "::/128",
        "fd00:ec2::254/128",
        "168.63.129.16/32",  # Azure's WireServer (the platform's agent channel, DNS, health probes)
        "192.0.0.192/32",  # Oracle Cloud's metadata service
    )
)
# IPv6 forms that carry an IPv4 address in their last 32 bits: NAT64 and the old "compatible".
IPV4_CARRIERS = (ipaddress.ip_network("64:ff9b::/96"), ipaddress.ip_network("::/96"))


EXAMPLE = "e.g. http://10.0.0.5:8006"


class AddressError(ValueError):
    """An address that may not be a backend; the message says why."""


def check_backend_address(host: str, allowed_networks: Sequence[Network] = (), resolve: bool = True) -> None:
    """Raise AddressError unless `host` may be a backend; a name is resolved unless `resolve` is False."""
    try:
        addresses: list[IPAddress] = [ipaddress.ip_address(host)]
    except ValueError:
        if not HOSTNAME_PATTERN.fullmatch(host):
            raise AddressError("must be an IPv4 or IPv6 address or a DNS name.") from None
        if not resolve:
            return
        addresses = resolve_host(host)
    for address in addresses:
        _check_address(host, address, allowed_networks)


def checked_monitor_url(url: str, allowed_networks: Sequence[Network] = (), resolve: bool = True) -> str:
    """A resource monitor's URL as `http(s)://host[:port]`; AddressError unless it may be one.

    The host is held to the backend rules. No path: the monitor answers at its root (the gateway
    reads `<url>/resources`), and a path of a registrant's choosing would aim the gateway's
    requests anywhere on a host.
    """
    if not (url.isascii() and url.isprintable()) or " " in url:
        raise AddressError("must be a plain http:// or https:// URL, without spaces or control characters.")
    try:
        parts = urlsplit(url)
        port = parts.port  # ValueError for a port that is not digits, or over 65535
    except ValueError:  # also "http://[" (an unclosed IPv6 bracket)
        raise AddressError(
            f"must be an http:// or https:// URL with a host and a port from 1 to 65535, {EXAMPLE}."
        ) from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise AddressError(f"must be an http:// or https:// URL with a host, {EXAMPLE}.")
    if port == 0 or (port is None and parts.netloc.endswith(":")):
        raise AddressError(f"must have a port from 1 to 65535 (or none, for the scheme's own), {EXAMPLE}.")
    if parts.username is not None or parts.password is not None:
        raise AddressError("may not carry credentials.")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise AddressError(f"may not have a path, query or fragment: the monitor answers at its root, {EXAMPLE}.")
    check_backend_address(parts.hostname, allowed_networks, resolve)
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    return f"{parts.scheme}://{host}" + (f":{port}" if port is not None else "")


class Listener(NamedTuple):
    """Where a request reached the gateway: the port, and the local address when it is known."""

    port: int
    ip: IPAddress | None = None


def is_the_gateway(host: str, port: int, listener: Listener) -> bool:
    """True when `host:port` is the listener itself: its port at a loopback, unspecified or its own address."""
    if port != listener.port:
        return False
    try:
        found: list[IPAddress] = [ipaddress.ip_address(host)]
    except ValueError:
        found = resolve_host(host)
    local = with_embedded_ipv4(listener.ip)[-1] if listener.ip is not None else None
    for address in found:
        plain = with_embedded_ipv4(address)[-1]
        if plain.is_loopback or plain.is_unspecified or plain == local:
            return True
    return False


def resolve_host(host: str) -> list[IPAddress]:
    """The addresses a name (or an address) stands for; AddressError when it does not resolve."""
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except (socket.gaierror, UnicodeError):
        raise AddressError(f"the name {host!r} does not resolve.") from None
    return [ipaddress.ip_address(str(info[4][0]).split("%")[0]) for info in infos]


def _check_address(host: str, address: IPAddress, allowed: Sequence[Network]) -> None:
    if isinstance(address, ipaddress.IPv6Address) and address.scope_id:
        raise AddressError(f"{host}: IPv6 zone ids are not supported; register a routable address.")
    for plain in with_embedded_ipv4(address):
        shown = host if str(plain) == host else f"{host} ({plain})"
        if plain.is_multicast or any(plain in net for net in BLOCKED_NETWORKS if net.version == plain.version):
            raise AddressError(
                f"{shown} is a link-local, metadata, broadcast, multicast or unspecified address"
                " and may not be a backend."
            )
    plain = with_embedded_ipv4(address)[-1]
    if allowed and not any(plain in net for net in allowed if net.version == plain.version):
        raise AddressError(f"{host} is outside ALLOWED_BACKEND_NETWORKS.")


def with_embedded_ipv4(address: IPAddress) -> list[IPAddress]:
    """The address, then the IPv4 address it carries (mapped, NAT64, compatible, 6to4), if any."""
    if not isinstance(address, ipaddress.IPv6Address):
        return [address]
    carried = address.ipv4_mapped or address.sixtofour
    if carried is None and address != ipaddress.IPv6Address("::1") and any(address in n for n in IPV4_CARRIERS):
        carried = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return [address, carried] if carried is not None else [address]
