"""The shapes of the gateway's JSON replies, as marshmallow schemas that /openapi.json describes.

The views build their replies as plain dicts; these schemas document them, and the fuzz test
(tests/api/test_openapi_fuzz.py) checks every reply of a live gateway against them. Like every
marshmallow schema they allow no undeclared field (additionalProperties: false), so a field
added to a reply must be added here too.
"""

from __future__ import annotations

from typing import Any

from marshmallow import INCLUDE, Schema, fields

from gateway.api.schemas import ServerOptionsSchema

NULLABLE: dict[str, Any] = {"allow_none": True, "required": True}


class ErrorSchema(Schema):
    """Every error the gateway makes itself: `{"success": false, "message": ..., "errors": ...}`."""

    success = fields.Boolean(required=True, metadata={"enum": [False]})
    message = fields.String(required=True)
    errors = fields.Raw(**NULLABLE, metadata={"description": "each field's messages for a 400; null otherwise"})


class SuccessSchema(Schema):
    """A reply that succeeded."""

    success = fields.Boolean(required=True, metadata={"enum": [True]})
    message = fields.String()


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
    workers = fields.Nested("WorkerListSchema", required=True, metadata={"description": "as GET /admin/workers"})


class DashboardReplySchema(SuccessSchema):
    """`GET /dashboard/data`: counters, the last sweep, charts, servers, jobs and workers, for the dashboard's page."""

    data = fields.Nested(DashboardSchema, required=True)


class OpenAIModelSchema(Schema):
    """A model in OpenAI's list shape."""

    id = fields.String(required=True)
    object = fields.String(required=True, metadata={"enum": ["model"]})
    created = fields.Integer(required=True)
    owned_by = fields.String(required=True)


class OpenAIModelListSchema(Schema):
    """`GET /v1/models`: every model some server can take work for now."""

    object = fields.String(required=True, metadata={"enum": ["list"]})
    data = fields.List(fields.Nested(OpenAIModelSchema), required=True)


class OllamaModelSchema(Schema):
    """A model in Ollama's /api/tags shape."""

    name = fields.String(required=True)
    model = fields.String(required=True)
    modified_at = fields.String(required=True)
    size = fields.Integer(required=True)
    digest = fields.String(required=True)
    details = fields.Dict(required=True)


class OllamaTagsSchema(Schema):
    """`GET /api/tags`: every model some server can take work for now."""

    models = fields.List(fields.Nested(OllamaModelSchema), required=True)


class OpenAIErrorDetailSchema(Schema):
    """OpenAI's error object."""

    message = fields.String(required=True)
    type = fields.String(required=True, metadata={"enum": ["invalid_request_error", "server_error"]})
    param = fields.String(**NULLABLE, metadata={"description": "the body's field at fault, when one is"})
    code = fields.String(**NULLABLE, metadata={"description": "model_not_found, model_unavailable, ... or null"})


class OpenAIErrorSchema(Schema):
    """Every error under /v1/, in OpenAI's shape."""

    error = fields.Nested(OpenAIErrorDetailSchema, required=True)


class OllamaErrorSchema(Schema):
    """An error of the Ollama routes, in Ollama's shape."""

    error = fields.String(required=True)


class OllamaRunningModelSchema(Schema):
    """A loaded model: the server's own /api/ps entry, as it sent it, plus the server it is loaded on."""

    server = fields.String(required=True, metadata={"description": "the id of the server that has it loaded"})

    class Meta:
        unknown = INCLUDE  # the server's fields (name, model, size, size_vram, expires_at, ...) pass as they are


class OllamaPsSchema(Schema):
    """`GET /api/ps`: the models loaded on the healthy servers that answered in time."""

    models = fields.List(fields.Nested(OllamaRunningModelSchema), required=True)


class OllamaVersionSchema(Schema):
    """`GET /api/version`: the lowest version the healthy servers report."""

    version = fields.String(required=True)


JOB_STATUSES = ["queued", "running", "succeeded", "failed", "cancelled", "expired"]


class JobAcceptedSchema(SuccessSchema):
    """202 Accepted: a request stored as a job; `Location` names `/jobs/<job_id>`."""

    job_id = fields.String(required=True, metadata={"description": "128 random bits, 32 hex digits"})
    status = fields.String(required=True, metadata={"enum": JOB_STATUSES})
    position = fields.Integer(**NULLABLE, metadata={"description": "1 runs next; null once it is not queued"})
    estimated_wait_seconds = fields.Float(
        **NULLABLE, metadata={"description": "from measured run times and free slots; null with no server up"}
    )


class JobReplySchema(JobAcceptedSchema):
    """`GET /jobs/<id>`: a job's state, its place in the queue and its estimated wait."""

    priority = fields.Integer(required=True, metadata={"minimum": 0, "maximum": 9})
    task_type = fields.String(required=True, metadata={"description": "the proxied prefix, or the model"})
    attempts = fields.Integer(required=True)
    server_id = fields.String(**NULLABLE, metadata={"description": "the server that ran it (or runs it)"})
    created_at = fields.Float(required=True, metadata={"description": "Unix time"})
    started_at = fields.Float(**NULLABLE)
    finished_at = fields.Float(**NULLABLE)
    error = fields.String(**NULLABLE)


class JobRowSchema(Schema):
    """One job in the operator's list."""

    job_id = fields.String(required=True)
    status = fields.String(required=True, metadata={"enum": JOB_STATUSES})
    priority = fields.Integer(required=True)
    task_type = fields.String(required=True)
    attempts = fields.Integer(required=True)
    server_id = fields.String(**NULLABLE)
    created_at = fields.Float(required=True)
    started_at = fields.Float(**NULLABLE)
    finished_at = fields.Float(**NULLABLE)
    error = fields.String(**NULLABLE)


class JobListSchema(Schema):
    jobs = fields.List(fields.Nested(JobRowSchema), required=True)
    counts = fields.Dict(keys=fields.String(), values=fields.Integer(), required=True)
    queued_by_priority = fields.Dict(keys=fields.String(), values=fields.Integer(), required=True)
    oldest_queued_at = fields.Float(**NULLABLE)


class JobListReplySchema(SuccessSchema):
    """`GET /admin/jobs`: the newest jobs, and the queue at a glance."""

    data = fields.Nested(JobListSchema, required=True)


class JobPayloadSchema(Schema):
    """The request a leased job replays, as the gateway took it."""

    method = fields.String(required=True)
    target = fields.String(required=True, metadata={"description": "the path and query to send to the local service"})
    headers = fields.List(
        fields.List(fields.String(), metadata={"minItems": 2, "maxItems": 2}),
        required=True,
        metadata={"description": "[name, value] pairs, in order (a name may repeat)"},
    )
    body = fields.String(required=True, metadata={"format": "byte", "description": "base64"})


class LeasedJobSchema(Schema):
    """A leased job in seed 004's envelope, with its lease."""

    type = fields.String(required=True, metadata={"enum": ["task"]})
    version = fields.Integer(required=True, metadata={"enum": [1]})
    request_id = fields.String(required=True, metadata={"description": "the job id: a repeat carries the same"})
    task_type = fields.String(required=True, metadata={"description": "the proxied prefix, or the model"})
    model = fields.String(**NULLABLE)
    job_id = fields.String(required=True)
    lease_token = fields.String(required=True, metadata={"description": "send it with every call about this job"})
    lease_expires_at = fields.Float(required=True, metadata={"description": "Unix time; a heartbeat extends it"})
    attempt = fields.Integer(required=True, metadata={"description": "1 for the first try"})
    payload = fields.Nested(JobPayloadSchema, required=True)


class LeaseReplySchema(SuccessSchema):
    """`POST /workers/lease`: the jobs leased to the worker."""

    lease_seconds = fields.Float(required=True, metadata={"description": "JOB_LEASE_SECONDS: heartbeat well within"})
    jobs = fields.List(fields.Nested(LeasedJobSchema), required=True)


class HeldJobReplySchema(SuccessSchema):
    """A leased job after a heartbeat, a complete or a fail."""

    job_id = fields.String(required=True)
    status = fields.String(required=True, metadata={"enum": JOB_STATUSES})
    cancelled = fields.Boolean(required=True, metadata={"description": "true: the job was cancelled; stop it"})
    attempts = fields.Integer(required=True)
    lease_expires_at = fields.Float(**NULLABLE, metadata={"description": "while it runs: the lease's new end"})


class WorkerRowSchema(Schema):
    """One pull worker, as last heard from."""

    worker_id = fields.String(required=True)
    routes = fields.List(fields.String(), required=True)
    models = fields.List(fields.String(), required=True)
    max_jobs = fields.Integer(**NULLABLE, metadata={"description": "as its last lease asked"})
    state = fields.String(required=True, metadata={"enum": ["active", "gone"]})
    polling = fields.Boolean(required=True, metadata={"description": "a long poll of its is open now"})
    last_lease_at = fields.Float(**NULLABLE)
    last_heartbeat_at = fields.Float(**NULLABLE)
    last_seen_at = fields.Float(**NULLABLE)
    jobs = fields.List(fields.String(), required=True, metadata={"description": "the ids of the jobs it runs"})


class WorkerListSchema(Schema):
    workers = fields.List(fields.Nested(WorkerRowSchema), required=True)
    gone_after_seconds = fields.Float(required=True, metadata={"description": "three lease periods of silence"})


class WorkerListReplySchema(SuccessSchema):
    """`GET /admin/workers`: every pull worker heard from since the gateway started."""

    data = fields.Nested(WorkerListSchema, required=True)
