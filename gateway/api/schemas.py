"""Input validation for the webhook API (marshmallow schemas)."""

from __future__ import annotations

import base64
import binascii
import contextlib
import re
from collections.abc import Iterator, Sequence
from typing import Any

from marshmallow import INCLUDE, Schema, ValidationError, fields, post_load, validate, validates, validates_schema

from gateway.fleet import addresses
from gateway.fleet.addresses import SERVER_ID_PATTERN, Network
from gateway.fleet.model_memory import DEVICE_TYPES, MAX_DESCRIPTION, MAX_MODEL_GB, is_gigabytes
from gateway.fleet.server import is_text, server_url

# \x85 and \ufeff spelled out: Python's \s has the first and lacks the second, JSON Schema's (ECMA 262)
# the other way round, and /openapi.json gives this pattern to clients. No lone surrogates ("\ud800"):
# JSON may carry them, but UTF-8 cannot write them to the state file.
NAME_PATTERN = re.compile(r"\A[^\s\x00-\x1f\x7f\x85\ufeff\ud800-\udfff]{1,200}\Z")
MAX_ITEMS = 256


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


class Text(fields.String):
    """A string UTF-8 can write: no lone surrogates."""

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> str:
        text = super()._deserialize(value, attr, data, **kwargs)
        if not is_text(text):
            raise ValidationError("must be Unicode text without lone surrogates.")
        return text


class Flag(fields.Boolean):
    """JSON true or false, nothing else (not 1, not "yes")."""

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> bool:
        if not isinstance(value, bool):
            raise ValidationError("must be true or false.")
        return value


class Gigabytes(fields.Float):
    """A JSON number of GB above 0 and at most MAX_MODEL_GB; booleans and strings are refused."""

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> float:
        if not is_gigabytes(value):
            raise ValidationError(f"must be a number of GB above 0 and at most {MAX_MODEL_GB}.")
        return value  # an int stays an int, as the client wrote it


class Secret(fields.String):
    """The shared secret; accepted in the body and never echoed back."""


class ServerIdSchema(Schema):
    """Names one server; also carries the seed's `secret` field."""

    server_id = fields.String(
        required=True,
        validate=validate.Regexp(SERVER_ID_PATTERN, error="must be 1-64 characters of A-Z a-z 0-9 _ . -"),
    )
    secret = Secret(load_only=True)
    server_token = Secret(
        load_only=True,
        metadata={"description": "with REGISTRATION_BINDING=token, the token the id's first registration got"},
    )


class ServerOptionsSchema(Schema):
    """The routing options a registration or an operator may set; absent ones are left as they are."""

    weight = Count(1, 1000)
    priority = Count(1, 100)
    max_concurrent = Count(0, 100_000)
    models = fields.List(Name(), validate=validate.Length(max=MAX_ITEMS, error="may hold at most {max} names."))
    model_map = fields.Dict(
        keys=Name(), values=Name(), validate=validate.Length(max=MAX_ITEMS, error="may hold at most {max} names.")
    )
    labels = fields.Dict(keys=Name(), values=Text(validate=validate.Length(max=200)), validate=validate.Length(max=64))
    # Seed 001's fields (docs/servers.md, "What a server may declare")
    model_memory_gb = fields.Dict(
        keys=Name(),
        values=Gigabytes(),
        validate=validate.Length(max=MAX_ITEMS, error="may hold at most {max} names."),
        metadata={"description": "model name -> the GB of free memory a request for it needs on this server"},
    )
    type = fields.String(
        validate=validate.OneOf([*DEVICE_TYPES, *(kind.upper() for kind in DEVICE_TYPES)]),
        metadata={"description": "cpu or gpu (seed 001's CPU and GPU are taken too, and kept in lower case)"},
    )
    description = Text(validate=validate.Length(max=MAX_DESCRIPTION))
    skip_resource_check = Flag(metadata={"description": "true: never filtered by the resource monitor's readings"})
    max_allocations = Count(0, 1_000_000)  # allocations it may hold (docs/allocations.md); 0: no limit

    @post_load
    def unique_models(self, data: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        """Drop repeated model names, keeping the first of each; `type` in lower case."""
        if "models" in data:
            data["models"] = list(dict.fromkeys(data["models"]))
        if "type" in data:
            data["type"] = data["type"].lower()
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

    def __init__(
        self, allowed_networks: Sequence[Network] = (), listener: addresses.Listener | None = None, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        self.allowed_networks = tuple(allowed_networks)
        self.listener = listener  # where the request came in: that address is the gateway, never a backend

    @validates("ip")
    def validate_ip(self, value: str, **kwargs: Any) -> None:
        """An IPv4/IPv6 address or DNS name that is not (and does not resolve to) a blocked address."""
        with address_rules():
            addresses.check_backend_address(value, self.allowed_networks)

    @validates("monitor_url")
    def validate_monitor_url(self, value: str | None, **kwargs: Any) -> None:
        """An http(s) URL of the host's resource monitor, held to the same address rules."""
        if value is None:
            return
        with address_rules():
            addresses.checked_monitor_url(value, self.allowed_networks)

    @validates_schema(skip_on_field_errors=True)
    def validate_not_the_gateway(self, data: dict[str, Any], **kwargs: Any) -> None:
        """Not the gateway's own address: each request routed there would come back to it, in a loop."""
        ip, port = data["ip"], data["port"]
        with address_rules():
            if self.listener is not None and addresses.is_the_gateway(ip, port, self.listener):
                raise ValidationError(
                    f"{ip} port {port} is this gateway's own address (it took this request on port {port}):"
                    " every request routed there would come back to the gateway, in a loop.",
                    "ip",
                )

    @post_load
    def resolve_monitor(self, data: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        """Turn monitor_port or monitor_url into one `monitor_url` (or None)."""
        port, url = data.pop("monitor_port"), data.pop("monitor_url")
        if port is not None and url is not None:
            raise ValidationError("give monitor_port or monitor_url, not both.", "monitor_port")
        if url is not None:
            data["monitor_url"] = addresses.checked_monitor_url(url, resolve=False)  # checked above; its usual form
        else:
            data["monitor_url"] = server_url(data["ip"], port) if port else None
        return data


class ModelRequestSchema(Schema):
    """An OpenAI or Ollama body as llm.py reads it: `model` (or, for /api/show, `name`); the rest passes on."""

    model = fields.String(required=True, validate=validate.Length(min=1))
    stream = fields.Boolean()

    class Meta:
        unknown = INCLUDE


@contextlib.contextmanager
def address_rules() -> Iterator[None]:
    """Turn the fleet's AddressError into the field's ValidationError."""
    try:
        yield
    except addresses.AddressError as exc:
        raise ValidationError(str(exc)) from None


# -- pull workers (docs/jobs.md, "Pull workers") ------------------------------------------------

HEADER_NAME = re.compile(r"\A[!#$%&'*+\-.^_`|~0-9A-Za-z]{1,256}\Z")  # RFC 9110's token
HEADER_VALUE = re.compile(r"\A[\t\x20-\x7e\x80-\xff]{0,8192}\Z")  # no CR, LF, NUL or other controls
MAX_HEADERS = 256
MAX_ERROR_LENGTH = 2000


class Seconds(fields.Float):
    """A JSON number of seconds from `low` to `high`; booleans and strings are refused."""

    def __init__(self, low: float, high: float, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.low, self.high = low, high

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float) or not self.low <= value <= self.high:
            raise ValidationError(f"must be a number of seconds from {self.low:g} to {self.high:g}.")
        return float(value)


class HeaderPair(fields.Field[tuple[str, str]]):
    """One header as `[name, value]`: a token for its name, a value without CR, LF or NUL."""

    def __init__(self, **kwargs: Any) -> None:
        schema = {"type": "array", "items": {"type": "string"}, "minItems": 2, "maxItems": 2}
        super().__init__(metadata={**schema, "description": "[name, value]"}, **kwargs)

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> tuple[str, str]:
        if not (isinstance(value, list) and len(value) == 2 and all(isinstance(part, str) for part in value)):
            raise ValidationError("must be a [name, value] pair of strings.")
        name, text = value
        if not HEADER_NAME.fullmatch(name):
            raise ValidationError(f"{name[:64]!r} is not a header name (RFC 9110 token characters).")
        if not HEADER_VALUE.fullmatch(text):
            raise ValidationError(f"the value of {name} holds CR, LF, NUL or characters beyond Latin-1.")
        return name, text


class Base64(fields.Field[bytes]):
    """Bytes as standard base64 (RFC 4648, padded)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(metadata={"type": "string", "format": "byte"}, **kwargs)

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> bytes:
        if not isinstance(value, str):
            raise ValidationError("must be a base64 string.")
        try:
            return base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise ValidationError("must be standard base64 (RFC 4648, A-Z a-z 0-9 + /, padded with =).") from None


def header_pairs() -> fields.List:
    return fields.List(
        HeaderPair(), load_default=list, validate=validate.Length(max=MAX_HEADERS, error="may hold at most {max}.")
    )


class LeaseSchema(Schema):
    """The body of `POST /workers/lease`."""

    worker_id = fields.String(
        required=True,
        validate=validate.Regexp(SERVER_ID_PATTERN, error="must be 1-64 characters of A-Z a-z 0-9 _ . -"),
    )
    routes = fields.List(
        fields.String(),
        validate=validate.Length(min=1, max=MAX_ITEMS, error="must hold 1 to {max} prefixes."),
        metadata={"description": "proxied prefixes (PROXY_PREFIXES) whose jobs this worker runs"},
    )
    models = fields.List(
        Name(),
        validate=validate.Length(min=1, max=MAX_ITEMS, error="must hold 1 to {max} names."),
        metadata={"description": "models whose jobs this worker runs"},
    )
    max_jobs = Count(1, 100, load_default=1)
    wait_seconds = Seconds(0, 30, load_default=0.0)

    def __init__(self, prefixes: Sequence[str] = (), **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.prefixes = tuple(prefixes)  # the gateway's PROXY_PREFIXES: the task types a route can name

    @validates("routes")
    def validate_routes(self, value: list[str], **kwargs: Any) -> None:
        """Each a prefix the gateway proxies: a job's task type is one of them, never a longer path."""
        unknown = [route for route in value if route not in self.prefixes]
        if unknown:
            known = ", ".join(self.prefixes)
            message = f"{unknown[0][:200]!r} is not a proxied prefix; the gateway proxies (PROXY_PREFIXES) {known}"
            raise ValidationError(message)

    @validates_schema
    def validate_serves_something(self, data: dict[str, Any], **kwargs: Any) -> None:
        if "routes" not in data and "models" not in data:
            raise ValidationError("give routes or models (or both): the jobs this worker runs.", "routes")

    @post_load
    def unique(self, data: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        """Routes and models as tuples, repeats dropped."""
        for name in ("routes", "models"):
            data[name] = tuple(dict.fromkeys(data.get(name, ())))
        return data


class LeaseTokenSchema(Schema):
    """The body of `POST /jobs/<id>/heartbeat`: the lease token the job was leased with."""

    lease_token = fields.String(required=True, validate=validate.Length(min=1, max=200))


class JobAnswerSchema(LeaseTokenSchema):
    """The body of `POST /jobs/<id>/complete`: the local service's answer, its body in base64."""

    status = Count(100, 599, required=True)
    headers = header_pairs()
    body = Base64(load_default=bytes)

    def __init__(self, max_body_bytes: int = 100 * 1024 * 1024, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.max_body_bytes = max_body_bytes

    @validates("body")
    def validate_size(self, value: bytes, **kwargs: Any) -> None:
        if len(value) > self.max_body_bytes:
            raise ValidationError(f"decodes to over {self.max_body_bytes} bytes (PROXY_MAX_BODY_BYTES).")


class JobFailureSchema(JobAnswerSchema):
    """The body of `POST /jobs/<id>/fail`: why, whether to try again, and the answer if one came."""

    error = Text(required=True, validate=validate.Length(min=1, max=MAX_ERROR_LENGTH))
    retry = Flag(required=True)
    status = Count(100, 599, metadata={"description": "the local service's answer, if it gave one (a 5xx, say)"})

    @validates_schema(skip_on_field_errors=True)
    def validate_answer(self, data: dict[str, Any], **kwargs: Any) -> None:
        """Headers or a body belong to an answer: they come with its status."""
        if "status" not in data and (data["headers"] or data["body"]):
            raise ValidationError("give the answer's status with its headers or body.", "status")
