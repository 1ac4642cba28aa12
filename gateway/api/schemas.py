"""Input validation for the webhook API (marshmallow schemas)."""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

from marshmallow import INCLUDE, Schema, ValidationError, fields, post_load, validate, validates

from gateway.fleet.server import server_url

SERVER_ID_PATTERN = re.compile(r"\A[A-Za-z0-9_.-]{1,64}\Z")
# RFC 1123 host names: labels of 1-63 letters, digits and inner hyphens, 253 characters in all.
HOSTNAME_PATTERN = re.compile(r"(?=.{1,253}\.?$)(?!-)[A-Za-z0-9-]{1,63}(?<!-)(\.(?!-)[A-Za-z0-9-]{1,63}(?<!-))*\.?")

# \x85 and \ufeff spelled out: Python's \s has the first and lacks the second, JSON Schema's (ECMA 262)
# the other way round, and /openapi.json gives this pattern to clients.
NAME_PATTERN = re.compile(r"\A[^\s\x00-\x1f\x7f\x85\ufeff]{1,200}\Z")
MAX_ITEMS = 256

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

# A cloud metadata service (169.254.169.254; AWS's IPv6 one is fd00:ec2::254) must never
# become a backend, nor may "this host", broadcast or a multicast group.
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
    )
)
# IPv6 forms that carry an IPv4 address in their last 32 bits: NAT64 and the old "compatible".
IPV4_CARRIERS = (ipaddress.ip_network("64:ff9b::/96"), ipaddress.ip_network("::/96"))


class Port(fields.Integer):
    """An integer from 1 to 65535, given as a JSON number or a string of digits."""

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> int:
        digits = isinstance(value, str) and value.isascii() and value.isdecimal()
        if isinstance(value, bool) or not (isinstance(value, int) or digits):
            raise ValidationError("must be an integer from 1 to 65535.")
        port = int(value)
        if not 1 <= port <= 65535:
            raise ValidationError("must be an integer from 1 to 65535.")
        return port


class Count(fields.Integer):
    """A JSON integer from `low` to `high`; booleans and strings are refused."""

    def __init__(self, low: int, high: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.low, self.high = low, high

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not self.low <= value <= self.high:
            raise ValidationError(f"must be an integer from {self.low} to {self.high}.")
        return value


class Name(fields.String):
    """A model name or label: 1-200 printable characters without spaces."""

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> str:
        if not isinstance(value, str) or not NAME_PATTERN.fullmatch(value):
            raise ValidationError("must be 1-200 printable characters without spaces.")
        return value


class Secret(fields.String):
    """The shared secret; accepted in the body and never echoed back."""


class ServerIdSchema(Schema):
    """Names one server; also carries the seed's `secret` field."""

    server_id = fields.String(
        required=True,
        validate=validate.Regexp(SERVER_ID_PATTERN, error="must be 1-64 characters of A-Z a-z 0-9 _ . -"),
    )
    secret = Secret(load_only=True)


class ServerOptionsSchema(Schema):
    """The routing options a registration or an operator may set; absent ones are left as they are."""

    weight = Count(1, 1000)
    priority = Count(1, 100)
    max_concurrent = Count(0, 100_000)
    models = fields.List(Name(), validate=validate.Length(max=MAX_ITEMS, error="may hold at most {max} names."))
    model_map = fields.Dict(
        keys=Name(), values=Name(), validate=validate.Length(max=MAX_ITEMS, error="may hold at most {max} names.")
    )
    labels = fields.Dict(
        keys=Name(), values=fields.String(validate=validate.Length(max=200)), validate=validate.Length(max=64)
    )

    @post_load
    def unique_models(self, data: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        """Drop repeated model names, keeping the first of each."""
        if "models" in data:
            data["models"] = list(dict.fromkeys(data["models"]))
        return data


class RegisterSchema(ServerIdSchema, ServerOptionsSchema):
    """The body of `POST /webhook/register`."""

    ip = fields.String(
        required=True,
        metadata={"anyOf": [{"format": "ipv4"}, {"format": "ipv6"}, {"format": "hostname"}]},  # for /openapi.json
    )
    port = Port(required=True)
    monitor_port = Port(load_default=None)
    monitor_url = fields.String(load_default=None)

    def __init__(self, allowed_networks: Sequence[Network] = (), **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.allowed_networks = tuple(allowed_networks)

    @validates("ip")
    def validate_ip(self, value: str, **kwargs: Any) -> None:
        """An IPv4/IPv6 address or DNS name that is not (and does not resolve to) a blocked address."""
        check_backend_address(value, self.allowed_networks)

    @validates("monitor_url")
    def validate_monitor_url(self, value: str | None, **kwargs: Any) -> None:
        """An http(s) URL of the host's resource monitor, held to the same address rules."""
        if value is None:
            return
        malformed = "must be an http:// or https:// URL with a host, e.g. http://10.0.0.5:8006."
        try:
            parts = urlsplit(value)
            port = parts.port  # ValueError for a port that is not a number up to 65535
        except ValueError:  # "http://[" (an unclosed IPv6 bracket), "http://h:99999"
            raise ValidationError(malformed) from None
        if parts.scheme not in ("http", "https") or not parts.hostname or port == 0 or parts.query or parts.fragment:
            raise ValidationError(malformed)
        if parts.username or parts.password:
            raise ValidationError("may not carry credentials.")
        check_backend_address(parts.hostname, self.allowed_networks)

    @post_load
    def resolve_monitor(self, data: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        """Turn monitor_port or monitor_url into one `monitor_url` (or None)."""
        port, url = data.pop("monitor_port"), data.pop("monitor_url")
        if port is not None and url is not None:
            raise ValidationError("give monitor_port or monitor_url, not both.", "monitor_port")
        data["monitor_url"] = url.rstrip("/") if url else (server_url(data["ip"], port) if port else None)
        return data


class ModelRequestSchema(Schema):
    """An OpenAI or Ollama body as llm.py reads it: `model` (or, for /api/show, `name`); the rest passes on."""

    model = fields.String(required=True, validate=validate.Length(min=1))
    stream = fields.Boolean()

    class Meta:
        unknown = INCLUDE


def check_backend_address(host: str, allowed_networks: Sequence[Network] = ()) -> None:
    """Raise ValidationError unless `host` may be a backend."""
    try:
        addresses: list[IPAddress] = [ipaddress.ip_address(host)]
    except ValueError:
        if not HOSTNAME_PATTERN.fullmatch(host):
            raise ValidationError("must be an IPv4 or IPv6 address or a DNS name.") from None
        addresses = _resolve(host)
    for address in addresses:
        _check_address(host, address, allowed_networks)


def _resolve(host: str) -> list[IPAddress]:
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except (socket.gaierror, UnicodeError):
        raise ValidationError(f"the name {host!r} does not resolve.") from None
    return [ipaddress.ip_address(str(info[4][0]).split("%")[0]) for info in infos]


def _check_address(host: str, address: IPAddress, allowed: Sequence[Network]) -> None:
    if isinstance(address, ipaddress.IPv6Address) and address.scope_id:
        raise ValidationError(f"{host}: IPv6 zone ids are not supported; register a routable address.")
    for plain in _with_embedded_ipv4(address):
        shown = host if str(plain) == host else f"{host} ({plain})"
        if plain.is_multicast or any(plain in net for net in BLOCKED_NETWORKS if net.version == plain.version):
            raise ValidationError(
                f"{shown} is a link-local, metadata, broadcast, multicast or unspecified address"
                " and may not be a backend."
            )
    plain = _with_embedded_ipv4(address)[-1]
    if allowed and not any(plain in net for net in allowed if net.version == plain.version):
        raise ValidationError(f"{host} is outside ALLOWED_BACKEND_NETWORKS.")


def _with_embedded_ipv4(address: IPAddress) -> list[IPAddress]:
    """The address, then the IPv4 address it carries (mapped, NAT64, compatible, 6to4), if any."""
    if not isinstance(address, ipaddress.IPv6Address):
        return [address]
    carried = address.ipv4_mapped or address.sixtofour
    if carried is None and address != ipaddress.IPv6Address("::1") and any(address in n for n in IPV4_CARRIERS):
        carried = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return [address, carried] if carried is not None else [address]
