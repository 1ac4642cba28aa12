"""The replies about durable jobs: to whoever submitted one, in the operator's list, and to the pull workers."""

from __future__ import annotations

from marshmallow import Schema, fields

from gateway.api.replies import NULLABLE, SuccessSchema

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
