"""The shapes of /allocations' replies, which /openapi.json describes and the fuzz test checks replies against."""

from __future__ import annotations

from marshmallow import Schema, fields

from gateway.allocations.records import MOVE_TYPES, OUTCOMES, STRATEGIES
from gateway.api.replies import NULLABLE, SuccessSchema


class AllocationSchema(Schema):
    """One key pinned to one server."""

    key = fields.String(required=True)
    server_id = fields.String(required=True)
    strategy = fields.String(required=True, metadata={"enum": list(STRATEGIES)})
    group = fields.String(**NULLABLE)
    location = fields.String(**NULLABLE)
    created_at = fields.String(required=True)
    updated_at = fields.String(required=True, metadata={"description": "when it was placed or last moved"})


class PlacementSchema(AllocationSchema):
    """An allocation with the score of its server and why it is there."""

    load_score = fields.Float(
        **NULLABLE, metadata={"description": "its server's allocation score (0-100); null when it takes no keys now"}
    )
    reason = fields.String(required=True)


class PlacementReplySchema(SuccessSchema):
    """`POST /allocations` and `POST /allocations/<key>/move`."""

    changed = fields.Boolean(required=True, metadata={"description": "false: it was there already"})
    data = fields.Nested(PlacementSchema, required=True)


class AllocationReplySchema(SuccessSchema):
    """`GET` and `DELETE /allocations/<key>`."""

    data = fields.Nested(AllocationSchema, required=True)


class AllocationListSchema(Schema):
    allocations = fields.List(fields.Nested(AllocationSchema), required=True)
    total = fields.Integer(required=True, metadata={"description": "every key (of the server asked about)"})
    counts = fields.Dict(keys=fields.String(), values=fields.Integer(), required=True)
    scores = fields.Dict(
        keys=fields.String(),
        values=fields.Float(),
        required=True,
        metadata={"description": "each server that takes keys now, by its allocation score"},
    )


class AllocationListReplySchema(SuccessSchema):
    """`GET /allocations`."""

    data = fields.Nested(AllocationListSchema, required=True)


class HistoryEntrySchema(Schema):
    """One entry of a key's history."""

    key = fields.String(required=True)
    type = fields.String(required=True, metadata={"enum": list(MOVE_TYPES)})
    server_id = fields.String(required=True, metadata={"description": "where it went, or was to go"})
    from_server_id = fields.String(**NULLABLE)
    load_score = fields.Float(**NULLABLE)
    strategy = fields.String(required=True, metadata={"enum": list(STRATEGIES)})
    reason = fields.String(required=True)
    outcome = fields.String(required=True, metadata={"enum": list(OUTCOMES)})
    move_id = fields.String(**NULLABLE, metadata={"description": "its announcement's webhook-id"})
    created_at = fields.String(required=True)


class HistorySchema(Schema):
    key = fields.String(required=True)
    history = fields.List(fields.Nested(HistoryEntrySchema), required=True)


class HistoryReplySchema(SuccessSchema):
    """`GET /allocations/history`."""

    data = fields.Nested(HistorySchema, required=True)


class RebalanceMoveSchema(Schema):
    """One move of a rebalance, planned (a dry run) or tried."""

    key = fields.String(required=True)
    from_server_id = fields.String(required=True)
    to_server_id = fields.String(required=True)
    from_score = fields.Float(required=True)
    to_score = fields.Float(required=True)
    gap = fields.Float(required=True)
    outcome = fields.String(required=True, metadata={"enum": ["planned", "applied", "refused", "skipped"]})
    reason = fields.String(required=True)


class RebalanceResultSchema(Schema):
    dry_run = fields.Boolean(required=True)
    threshold = fields.Float(required=True)
    max_migrations = fields.Integer(required=True)
    moves = fields.List(fields.Nested(RebalanceMoveSchema), required=True)
    moved = fields.Integer(required=True)
    refused = fields.Integer(required=True)
    scores_before = fields.Dict(keys=fields.String(), values=fields.Float(), required=True)
    scores_after = fields.Dict(
        keys=fields.String(),
        values=fields.Float(),
        required=True,
        metadata={"description": "after the moves; a dry run's counts only its allocation shares anew"},
    )


class RebalanceReplySchema(SuccessSchema):
    """`POST /allocations/rebalance`."""

    data = fields.Nested(RebalanceResultSchema, required=True)
