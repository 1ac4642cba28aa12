"""The LLM routes' own replies, in OpenAI's and Ollama's shapes: the models, those loaded, the version, errors."""

from __future__ import annotations

from marshmallow import INCLUDE, Schema, fields

from gateway.api.replies import NULLABLE


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
