"""What the gateway says of itself: /health, /status and the dashboard's data."""

from __future__ import annotations

from marshmallow import Schema, fields

from gateway.api.job_replies import WorkerListSchema
from gateway.api.replies import NULLABLE, SuccessSchema


class HealthSchema(Schema):
    """`GET /health`: the gateway itself is serving."""

    status = fields.String(required=True, metadata={"enum": ["ok"]})
    version = fields.String(required=True)
    uptime_s = fields.Float(required=True)


class HealthJobSchema(Schema):
    """The health sweep's schedule and its latest run."""

    running = fields.Boolean(required=True)
    interval_s = fields.Float(required=True)
    last_sweep = fields.Dict(**NULLABLE, metadata={"description": "time and duration_s of the latest sweep"})


class StateSchema(Schema):
    """Where the fleet is kept; in Redis mode, whether Redis answers and which process sweeps."""

    store = fields.String(required=True, metadata={"description": "embedded or redis"})
    path = fields.String(allow_none=True, metadata={"description": "embedded: the servers file"})
    redis = fields.String(metadata={"description": "redis: host:port/db, never the password"})
    redis_up = fields.Boolean(metadata={"description": "redis: whether the last call got through"})
    fleet_version = fields.Integer(metadata={"description": "redis: the fleet version this process has"})
    sweep_leader = fields.String(
        allow_none=True, metadata={"description": "redis: host:pid of the process that sweeps"}
    )
    leads_here = fields.Boolean(metadata={"description": "redis: whether this process sweeps"})


class StatusSchema(Schema):
    """Version, uptime, policy, the health job, server counts and request totals."""

    version = fields.String(required=True)
    uptime_s = fields.Float(required=True)
    routing_policy = fields.String(required=True)
    health_check = fields.Nested(HealthJobSchema, required=True)
    servers = fields.Dict(keys=fields.String(), values=fields.Integer(), required=True)
    state = fields.Nested(StateSchema, required=True)
    requests = fields.Dict(required=True, metadata={"description": "total, and by_status_class ('2xx': n, ...)"})


class StatusReplySchema(SuccessSchema):
    """`GET /status`."""

    data = fields.Nested(StatusSchema, required=True)


class ChartsSchema(Schema):
    """The last 15 minutes in 10 s buckets, oldest first; the last bucket is the current one, so far."""

    rps = fields.List(fields.Float(), required=True, metadata={"description": "requests per second"})
    error_rate = fields.List(
        fields.Float(allow_none=True),
        required=True,
        metadata={"description": "the share of requests that were 5xx; null for a bucket without requests"},
    )
    p95_s = fields.List(
        fields.Float(allow_none=True),
        required=True,
        metadata={"description": "95th percentile latency in seconds; null for a bucket without requests"},
    )


class DashboardChartsSchema(Schema):
    """The buckets' size and number, and the fleet's charts: every request the proxy counted."""

    bucket_seconds = fields.Integer(required=True)
    buckets = fields.Integer(required=True)
    fleet = fields.Nested(ChartsSchema, required=True)


class DashboardSummarySchema(Schema):
    """The page's counters."""

    total_servers = fields.Integer(required=True)
    healthy_servers = fields.Integer(required=True)
    unhealthy_servers = fields.Integer(required=True)
    health_check_running = fields.Boolean(required=True)
    requests_total = fields.Integer(required=True, metadata={"description": "requests a server answered"})
    requests_not_proxied = fields.Integer(
        required=True, metadata={"description": 'requests no server had (server="none": 503s, 404s)'}
    )


class LastSweepSchema(Schema):
    """When the latest health sweep began, and how long it took."""

    time = fields.String(required=True)
    duration_s = fields.Float(required=True)


class DashboardServerSchema(Schema):
    """One server's row on the page, with its charts."""

    server_id = fields.String(required=True)
    address = fields.String(required=True)
    is_healthy = fields.Boolean(required=True)
    health_changed_time = fields.String(**NULLABLE)
    last_check_time = fields.String(**NULLABLE)
    last_error = fields.String(**NULLABLE, metadata={"description": "why the last health check failed"})
    fail_count = fields.Integer(required=True)
    in_flight = fields.Integer(required=True)
    max_concurrent = fields.Integer(required=True, metadata={"description": "its cap on in_flight; 0: none"})
    served = fields.Integer(required=True)
    allocations = fields.Integer(required=True, metadata={"description": "allocation keys pinned to it now"})
    max_allocations = fields.Integer(required=True, metadata={"description": "its cap on allocations; 0: none"})
    gpu_memory_free = fields.Integer(**NULLABLE)
    gpu_memory_total = fields.Integer(**NULLABLE, metadata={"description": "null without a fresh reading"})
    weight = fields.Integer(required=True)
    priority = fields.Integer(required=True)
    draining = fields.Boolean(required=True)
    ejected = fields.Boolean(required=True)
    ejection_seconds_left = fields.Float(**NULLABLE)
    models = fields.List(fields.String(), required=True)
    loaded_models = fields.List(fields.String(), required=True, metadata={"description": "in its memory now"})
    charts = fields.Nested(ChartsSchema, required=True)


class DashboardJobsSchema(Schema):
    """The job queue at a glance: jobs per status in the store now, queued ones per priority, the oldest wait."""

    queued = fields.Integer(required=True)
    running = fields.Integer(required=True, metadata={"description": "on servers and pull workers now"})
    succeeded = fields.Integer(required=True, metadata={"description": "finished jobs are kept JOB_RESULT_TTL"})
    failed = fields.Integer(required=True, metadata={"description": "dead letters, kept for the operator to retry"})
    cancelled = fields.Integer(required=True)
    expired = fields.Integer(required=True)
    queued_by_priority = fields.List(
        fields.Integer(),
        required=True,
        metadata={"minItems": 10, "maxItems": 10, "description": "queued jobs at priority 0 (first) to 9, by index"},
    )
    oldest_wait_s = fields.Float(
        **NULLABLE, metadata={"description": "seconds the oldest queued job has waited; null with none queued"}
    )


class DashboardSchema(Schema):
    """What the dashboard's page shows, and the token its actions send back."""

    now = fields.String(required=True)
    csrf_token = fields.String(
        required=True, metadata={"description": "this login's token: send it in X-CSRF-Token with every action"}
    )
    summary = fields.Nested(DashboardSummarySchema, required=True)
    last_sweep = fields.Nested(LastSweepSchema, **NULLABLE)
    charts = fields.Nested(DashboardChartsSchema, required=True)
    servers = fields.List(fields.Nested(DashboardServerSchema), required=True)
    jobs = fields.Nested(DashboardJobsSchema, required=True)
    workers = fields.Nested(WorkerListSchema, required=True, metadata={"description": "as GET /admin/workers"})


class DashboardReplySchema(SuccessSchema):
    """`GET /dashboard/data`: counters, the last sweep, charts, servers, jobs and workers, for the dashboard's page."""

    data = fields.Nested(DashboardSchema, required=True)
