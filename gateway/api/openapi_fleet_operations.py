"""How /openapi.json describes the fleet's and the operator's routes.

The webhook, /admin's servers and routing views, /health, /status, /metrics, the dashboard and /allocations.
"""

from __future__ import annotations

from typing import Any

from gateway.api import (
    admin,
    allocation_replies,
    allocation_schemas,
    allocations,
    dashboard,
    routing_replies,
    server_replies,
    status,
    status_replies,
    webhook,
)
from gateway.api.openapi_components import (
    ADMIN,
    DASHBOARD_ACTION,
    ERROR_RESPONSES,
    JSON,
    OPEN,
    WEBHOOK,
    RouteOperations,
    admin_operation,
    json_body,
    operation,
    reply,
)
from gateway.api.schemas import RegisterSchema, ServerIdSchema, ServerOptionsSchema
from gateway.observability import metrics


def dashboard_action(ok: Any) -> dict[str, Any]:
    """A change made from the dashboard's page: its login and CSRF token, as the admin API's change does."""
    return operation("dashboard", DASHBOARD_ACTION, reply(ok), 401, 403, 404, 503)


# At least one option: an empty change is a 400 that says so.
OPTIONS_CHANGE = admin_operation(
    server_replies.ServerReplySchema,
    400,
    404,
    503,
    requestBody=json_body({"allOf": [ServerOptionsSchema], "minProperties": 1}),
)
FLEET_OPERATIONS: RouteOperations = {
    webhook.register: {
        "post": operation(
            "webhook",
            WEBHOOK,
            reply(server_replies.RegisterReplySchema),
            400,
            401,
            413,
            503,
            requestBody=json_body(RegisterSchema),
        )
    },
    webhook.unregister: {
        "post": operation(
            "webhook",
            WEBHOOK,
            reply(server_replies.UnregisterReplySchema),
            400,
            401,
            404,
            413,
            503,
            requestBody=json_body(ServerIdSchema),
        )
    },
    webhook.list_servers: {
        "get": operation("webhook", [*WEBHOOK, {"webhookQuery": []}], reply(server_replies.FleetReplySchema), 401)
    },
    admin.list_servers: {"get": admin_operation(server_replies.ServerListReplySchema)},
    admin.add_server: {
        "post": {
            **admin_operation(server_replies.ServerReplySchema, 400, 413, 503, requestBody=json_body("AdminRegister")),
            "responses": {
                "200": reply(server_replies.ServerReplySchema, "The server was registered already and is updated."),
                "201": reply(server_replies.ServerReplySchema, "The server is registered."),
                **{str(code): ERROR_RESPONSES[code][0] for code in (400, 401, 413, 503)},
            },
        }
    },
    admin.get_server: {"get": admin_operation(server_replies.ServerReplySchema, 404)},
    admin.update_server: {"patch": OPTIONS_CHANGE, "put": OPTIONS_CHANGE},
    admin.delete_server: {"delete": admin_operation(server_replies.UnregisterReplySchema, 404, 503)},
    admin.drain_server: {"post": admin_operation(server_replies.ServerReplySchema, 404, 503)},
    admin.enable_server: {"post": admin_operation(server_replies.ServerReplySchema, 404, 503)},
    admin.reset_token: {"post": admin_operation(server_replies.ServerReplySchema, 404, 503)},
    admin.priority_check: {"get": admin_operation(routing_replies.PriorityCheckReplySchema)},
    admin.priority_overview: {"get": admin_operation(routing_replies.PriorityOverviewReplySchema)},
    admin.rankings: {"get": admin_operation(routing_replies.RankingsReplySchema)},
    admin.resource_cache_stats: {"get": admin_operation(routing_replies.ResourceCacheReplySchema)},
    admin.resource_cache_clear: {
        "post": {
            **admin_operation(routing_replies.ResourceCacheClearedReplySchema),
            "responses": {
                "202": reply(
                    routing_replies.ResourceCacheClearedReplySchema, "The readings are dropped; the monitors are read."
                ),
                "401": ERROR_RESPONSES[401][0],
            },
        }
    },
    status.health: {"get": operation("status", OPEN, reply(status_replies.HealthSchema))},
    status.status: {"get": operation("status", ADMIN, reply(status_replies.StatusReplySchema), 401)},
    metrics.scrape: {
        "get": operation(
            "status",
            [{}, {"metricsToken": []}],
            {"description": "The Prometheus text format.", "content": {"text/plain": {"schema": {"type": "string"}}}},
            401,
        )
    },
    dashboard.data: {
        "get": operation("dashboard", [{"dashboardSession": []}], reply(status_replies.DashboardReplySchema), 401)
    },
    dashboard.drain_server: {"post": dashboard_action(server_replies.ServerReplySchema)},
    dashboard.enable_server: {"post": dashboard_action(server_replies.ServerReplySchema)},
    dashboard.unregister_server: {"delete": dashboard_action(server_replies.UnregisterReplySchema)},
}


def allocation_operation(ok: Any, *errors: str, **extra: Any) -> dict[str, Any]:
    """An /allocations operation: the admin credential, a 401 without it, and its own refusals by name."""
    described = operation("allocations", ADMIN, reply(ok), 401, **extra)
    for named in errors:
        status = {"NoRoom": 503, "NoAllocation": 404, "MoveConflict": 409, "MoveRefused": 502}.get(named)
        described["responses"][str(status or named)] = named if status else ERROR_RESPONSES[int(named)][0]
    return described


def query(schema: Any) -> list[dict[str, Any]]:
    """A query string's parameters, from a schema's fields."""
    return [{"in": "query", "schema": schema}]


PLACED = allocation_replies.PlacementReplySchema
FLEET_OPERATIONS |= {
    allocations.allocate: {
        "post": {
            **allocation_operation(
                PLACED, "400", "413", "NoRoom", requestBody=json_body(allocation_schemas.AllocateSchema)
            ),
            "responses": {
                "200": reply(PLACED, "The key was allocated already: where it is."),
                "201": reply(PLACED, "The key is allocated: the server chosen, its load score, and why."),
                **{code: ERROR_RESPONSES[int(code)][0] for code in ("400", "401", "413")},
                "503": "NoRoom",
            },
        }
    },
    allocations.list_allocations: {
        "get": allocation_operation(
            allocation_replies.AllocationListReplySchema,
            "400",
            parameters=query(allocation_schemas.ListQuerySchema),
        )
    },
    allocations.history: {
        "get": allocation_operation(
            allocation_replies.HistoryReplySchema, "400", parameters=query(allocation_schemas.HistoryQuerySchema)
        )
    },
    allocations.rebalance: {
        "post": {
            **allocation_operation(allocation_replies.RebalanceReplySchema, "400", "413"),
            "requestBody": {
                "required": False,
                "content": {JSON: {"schema": allocation_schemas.RebalanceRequestSchema}},
            },
        }
    },
    allocations.get_allocation: {"get": allocation_operation(allocation_replies.AllocationReplySchema, "NoAllocation")},
    allocations.release_allocation: {
        "delete": allocation_operation(allocation_replies.AllocationReplySchema, "NoAllocation")
    },
    allocations.move_allocation: {
        "post": allocation_operation(
            PLACED,
            "400",
            "413",
            "NoAllocation",
            "MoveConflict",
            "MoveRefused",
            requestBody=json_body(allocation_schemas.MoveRequestSchema),
        )
    },
}
