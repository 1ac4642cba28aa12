"""The replies about GPU servers: a registration, an unregistration and the fleet's rows, by webhook and /admin."""

from __future__ import annotations

from marshmallow import Schema, fields

from gateway.api.replies import NULLABLE, SuccessSchema
from gateway.api.schemas import ServerOptionsSchema


class AddressSchema(Schema):
    """A server's id and where it is."""

    server_id = fields.String(required=True)
    ip = fields.String(required=True)
    port = fields.Integer(required=True)
    url = fields.String(required=True)


class RegisterReplySchema(SuccessSchema, AddressSchema, ServerOptionsSchema):
    """The reply to a registration: the server's address and its routing options."""

    monitor_url = fields.String(metadata={"description": "present when the server has a resource monitor"})
    kept_by_operator = fields.List(
        fields.String(),
        required=True,
        metadata={"description": "options this registration sent that the operator set through /admin, so kept"},
    )
    server_token = fields.String(
        metadata={
            "description": "with REGISTRATION_BINDING=token, once, when an id is bound: send it on its next calls"
        }
    )


class UnregisterReplySchema(SuccessSchema):
    """The reply to an unregistration."""

    server_id = fields.String(required=True)


class LoadedModelSchema(Schema):
    """A model in a server's memory, as its Ollama GET /api/ps said during the sweep."""

    name = fields.String(required=True)
    size_vram = fields.Integer(required=True, metadata={"description": "bytes of GPU memory it holds"})
    read_at = fields.String(
        required=True, metadata={"description": "the sweep that first read it loaded at this size (ISO 8601)"}
    )


class ServerRowSchema(AddressSchema, ServerOptionsSchema):
    """One server as the gateway shows it: the seed's fields, its options and its routing state."""

    is_healthy = fields.Boolean(required=True)
    fail_count = fields.Integer(required=True)
    last_check_time = fields.String(**NULLABLE)
    last_used_time = fields.String(**NULLABLE)
    monitor_url = fields.String(**NULLABLE)
    health_changed_time = fields.String(**NULLABLE)
    last_error = fields.String(
        **NULLABLE, metadata={"description": "why the last health check failed; null once one passes"}
    )
    draining = fields.Boolean(required=True)
    discovered_models = fields.List(fields.String(), required=True)
    loaded_models = fields.List(
        fields.Nested(LoadedModelSchema),
        required=True,
        metadata={"description": "in memory now (Ollama's /api/ps, read by the sweep): preferred for their model"},
    )
    in_flight = fields.Integer(required=True)
    cluster_in_flight = fields.Integer(
        allow_none=True, metadata={"description": "Redis mode, capped servers: slots held by every gateway process"}
    )
    ejected = fields.Boolean(required=True)
    ejection_seconds_left = fields.Float(**NULLABLE)
    effective_weight = fields.Float(required=True)
    served_models = fields.List(fields.String(), required=True)
    resources = fields.Dict(**NULLABLE, metadata={"description": "the latest resource monitor reading, if any"})
    operator_options = fields.List(
        fields.String(),
        required=True,
        metadata={"description": "options set through /admin, never overwritten by a registration"},
    )
    token_bound = fields.Boolean(required=True, metadata={"description": "whether the id is bound to a server_token"})


class FleetSchema(Schema):
    """The seed's `/webhook/servers` data: counts, the health job's state and every server."""

    total_servers = fields.Integer(required=True)
    healthy_servers = fields.Integer(required=True)
    unhealthy_servers = fields.Integer(required=True)
    health_check_running = fields.Boolean(required=True)
    servers = fields.List(fields.Nested(ServerRowSchema), required=True)


class FleetReplySchema(SuccessSchema):
    """`GET /webhook/servers`."""

    data = fields.Nested(FleetSchema, required=True)


class ServerListSchema(Schema):
    """Every server with its options, load and state."""

    servers = fields.List(fields.Nested(ServerRowSchema), required=True)


class ServerListReplySchema(SuccessSchema):
    """`GET /admin/servers`."""

    data = fields.Nested(ServerListSchema, required=True)


class ServerReplySchema(SuccessSchema):
    """One server, after a change or on its own."""

    data = fields.Nested(ServerRowSchema, required=True)
