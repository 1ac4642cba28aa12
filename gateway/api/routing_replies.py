"""The replies of /admin's routing views: the priority tiers, the load rankings and the resource cache."""

from __future__ import annotations

from marshmallow import Schema, fields

from gateway.api.replies import NULLABLE, SuccessSchema


class TierServerSchema(Schema):
    """A server of a tier that serves the model asked about."""

    server_id = fields.String(required=True)
    actual_model = fields.String(required=True)
    state = fields.String(
        required=True, metadata={"enum": ["available", "unhealthy", "draining", "ejected", "at_capacity"]}
    )
    weight = fields.Integer(required=True)
    in_flight = fields.Integer(required=True)
    max_concurrent = fields.Integer(required=True)


class TierCheckSchema(Schema):
    """One priority tier's servers for a model."""

    priority = fields.Integer(required=True)
    servers = fields.List(fields.Nested(TierServerSchema), required=True)


class PriorityCheckSchema(Schema):
    """Which tier and which servers would serve a model now."""

    model = fields.String(required=True)
    known = fields.Boolean(required=True)
    serving_tier = fields.Integer(**NULLABLE)
    tiers = fields.List(fields.Nested(TierCheckSchema), required=True)


class PriorityCheckReplySchema(SuccessSchema):
    """`GET /admin/server-priority/check/{model}`."""

    data = fields.Nested(PriorityCheckSchema, required=True)


class TierSchema(Schema):
    """One priority tier: its servers, how many can take work, the models it serves."""

    priority = fields.Integer(required=True)
    servers = fields.List(fields.String(), required=True)
    available = fields.Integer(required=True)
    models = fields.List(fields.String(), required=True)


class PriorityOverviewSchema(Schema):
    """Every priority tier, preferred first."""

    tiers = fields.List(fields.Nested(TierSchema), required=True)


class PriorityOverviewReplySchema(SuccessSchema):
    """`GET /admin/server-priority/overview`."""

    data = fields.Nested(PriorityOverviewSchema, required=True)


class RankingSchema(Schema):
    """A server's load score; null without a fresh resource reading."""

    server_id = fields.String(required=True)
    is_healthy = fields.Boolean(required=True)
    score = fields.Float(**NULLABLE)
    resources = fields.Dict(**NULLABLE)


class RankingsSchema(Schema):
    """Servers by load score, lowest first, with the weights and policy in force."""

    weights = fields.Dict(keys=fields.String(), values=fields.Float(), required=True)
    policy = fields.String(required=True)
    servers = fields.List(fields.Nested(RankingSchema), required=True)


class RankingsReplySchema(SuccessSchema):
    """`GET /admin/rankings`."""

    data = fields.Nested(RankingsSchema, required=True)


class ResourceCacheRowSchema(Schema):
    """One server's reading, as routing holds it."""

    server_id = fields.String(required=True)
    monitor_url = fields.String(**NULLABLE)
    state = fields.String(
        required=True,
        metadata={"enum": ["fresh", "stale", "none"], "description": "none: no reading (yet, or since a clear)"},
    )
    age_s = fields.Float(**NULLABLE)
    hits = fields.Integer(
        required=True, metadata={"description": "routing decisions that read it since the last clear, this process"}
    )
    skip_resource_check = fields.Boolean(required=True)
    resources = fields.Dict(**NULLABLE, metadata={"description": "the reading, as GET /admin/servers shows it"})


class ResourceCacheSchema(Schema):
    """Counts over the readings, and each server's."""

    stale_after_s = fields.Float(required=True, metadata={"description": "three HEALTH_CHECK_INTERVALs"})
    readings = fields.Integer(required=True)
    fresh = fields.Integer(required=True)
    stale = fields.Integer(required=True)
    hits = fields.Integer(required=True)
    servers = fields.List(fields.Nested(ResourceCacheRowSchema), required=True)


class ResourceCacheReplySchema(SuccessSchema):
    """`GET /admin/resource-cache/stats`."""

    data = fields.Nested(ResourceCacheSchema, required=True)


class ResourceCacheClearedSchema(Schema):
    cleared = fields.Integer(required=True, metadata={"description": "readings dropped"})
    reading = fields.List(fields.String(), required=True, metadata={"description": "servers whose monitor is read"})


class ResourceCacheClearedReplySchema(SuccessSchema):
    """`POST /admin/resource-cache/clear`: 202, the monitors are being read."""

    data = fields.Nested(ResourceCacheClearedSchema, required=True)
