"""Input validation for /allocations (docs/allocations.md): bodies and query strings, each bad field named."""

from __future__ import annotations

from typing import Any

from marshmallow import Schema, ValidationError, fields, validate, validates_schema

from gateway.allocations.records import KEY_PATTERN, STRATEGIES, key_problem
from gateway.api.schemas import Count, Flag, Name, Text
from gateway.fleet.addresses import SERVER_ID_PATTERN

MAX_LISTED = 10_000


class AllocationKey(fields.String):
    """An allocation key: 1-200 characters safe in a path, a header and a Redis key, not a route's name."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(metadata={"pattern": KEY_PATTERN.pattern, "maxLength": 200}, **kwargs)

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> str:
        if not isinstance(value, str):
            raise ValidationError("must be a string.")
        problem = key_problem(value)
        if problem is not None:
            raise ValidationError(problem)
        return value


class Percent(fields.Float):
    """A JSON number from 0 to 100 (a load score's gap); booleans and strings are refused."""

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 100:
            raise ValidationError("must be a number from 0 to 100.")
        return float(value)


def server_id_field(**kwargs: Any) -> fields.String:
    return fields.String(
        validate=validate.Regexp(SERVER_ID_PATTERN, error="must be 1-64 characters of A-Z a-z 0-9 _ . -"), **kwargs
    )


class AllocateSchema(Schema):
    """The body of `POST /allocations`."""

    key = AllocationKey(required=True)
    strategy = fields.String(
        load_default="load_balance",
        validate=validate.OneOf(STRATEGIES, error="must be one of: {choices}."),
    )
    location = Text(
        validate=validate.Length(min=1, max=200),
        metadata={"description": "the servers' `location` label to match (strategy location)"},
    )
    group = Name(metadata={"description": "the keys placed together (affinity) or spread (isolation)"})

    @validates_schema(skip_on_field_errors=True)
    def validate_strategy_needs(self, data: dict[str, Any], **kwargs: Any) -> None:
        """The location strategy needs a location; affinity and isolation need a group."""
        strategy = data["strategy"]
        if strategy == "location" and "location" not in data:
            raise ValidationError("the location strategy needs a location.", "location")
        if strategy in ("affinity", "isolation") and "group" not in data:
            raise ValidationError(f"the {strategy} strategy needs a group.", "group")


class MoveRequestSchema(Schema):
    """The body of `POST /allocations/<key>/move`."""

    server_id = server_id_field(required=True)


class RebalanceRequestSchema(Schema):
    """The body of `POST /allocations/rebalance`."""

    threshold = Percent(load_default=30.0, metadata={"minimum": 0, "maximum": 100})
    max_migrations = Count(1, 1000, load_default=10)
    dry_run = Flag(load_default=False)


class ListQuerySchema(Schema):
    """The query of `GET /allocations`."""

    server_id = server_id_field()
    limit = fields.Integer(load_default=1000, validate=validate.Range(1, MAX_LISTED))


class HistoryQuerySchema(Schema):
    """The query of `GET /allocations/history`."""

    key = AllocationKey(required=True)
    limit = fields.Integer(load_default=100, validate=validate.Range(1, 100))
