"""GET /openapi.json: the gateway's own API as OpenAPI 3.1, built once per app from its routes and schemas.

Paths come from the app's URL map, so only routes the app has are described (the LLM routes
when LLM_ROUTES is on, each configured proxy prefix). Bodies and replies come from the
marshmallow schemas in schemas.py and the *replies.py modules, through apispec's MarshmallowPlugin.
Each route's description is in openapi_fleet_operations.py or openapi_work_operations.py, and
the pieces they share (security schemes, named error replies) in openapi_components.py.
"""

from __future__ import annotations

import copy
import json
import re
from typing import Any

from apispec import APISpec
from apispec.ext.marshmallow import MarshmallowPlugin
from flask import Blueprint, Flask, Response, current_app
from marshmallow import fields

from gateway.api import replies
from gateway.api.openapi_components import (
    ERROR_RESPONSES,
    JSON,
    OPEN,
    OTHER_ERRORS,
    SECURITY_SCHEMES,
    RouteOperations,
    operation,
    reply,
)
from gateway.api.openapi_fleet_operations import FLEET_OPERATIONS
from gateway.api.openapi_work_operations import WORK_OPERATIONS
from gateway.api.schemas import NAME_PATTERN, Count, Gigabytes, Name, Port, RegisterSchema, Seconds
from gateway.fleet.model_memory import MAX_MODEL_GB

RULE_ARGUMENT = re.compile(r"<(?:[^:<>]+:)?([^<>]+)>")  # werkzeug's <converter:name>
# JSON Schema's integer takes 8000.0 too, which the gateway refuses, as it refuses true for 1.
WHOLE_NUMBER = "a JSON integer written without a fraction or exponent (8000, not 8000.0)"

bp = Blueprint("openapi", __name__)


@bp.get("/openapi.json")
def openapi_json() -> Response:
    """This API as OpenAPI 3.1."""
    return current_app.response_class(current_app.extensions["openapi"], mimetype=JSON)


OPERATIONS: RouteOperations = {
    **FLEET_OPERATIONS,
    **WORK_OPERATIONS,
    openapi_json: {"get": operation("status", OPEN, reply({"type": "object"}, "This document."))},
}


def build_spec(app: Flask) -> dict[str, Any]:
    """The OpenAPI document of every route of `app` that OPERATIONS describes."""
    plugin = MarshmallowPlugin()
    spec = APISpec(
        title="GPU Gateway",
        version=app.config["GATEWAY_VERSION"],
        openapi_version="3.1.0",
        plugins=[plugin],
        info={"description": "One stable address in front of a changing fleet of GPU servers."},
    )
    assert plugin.converter is not None  # set by APISpec's init_spec
    plugin.converter.add_attribute_function(field_properties)
    spec.components.schema("Error", schema=replies.ErrorSchema)
    spec.components.schema("AdminRegister", schema=RegisterSchema(exclude=("secret",)))  # the secret goes in a header
    for name, description in [*ERROR_RESPONSES.values(), *OTHER_ERRORS.items()]:
        spec.components.response(name, reply("Error", description))
    for scheme, definition in SECURITY_SCHEMES.items():
        spec.components.security_scheme(scheme, definition)
    for rule in sorted(app.url_map.iter_rules(), key=lambda rule: rule.rule):
        described = OPERATIONS.get(app.view_functions[rule.endpoint], {})
        methods = {method.lower() for method in rule.methods or ()}
        operations = {method: copy.deepcopy(op) for method, op in described.items() if method in methods}
        if not operations:
            continue
        path = RULE_ARGUMENT.sub(r"{\1}", rule.rule)
        summary = (app.view_functions[rule.endpoint].__doc__ or "").strip().splitlines()[0]
        parameters = [
            {"name": name, "in": "path", "required": True, "schema": path_schema(name)} for name in rule.arguments
        ]
        for method, op in operations.items():
            op.setdefault("summary", summary)
            op["operationId"] = re.sub(r"\W+", "_", f"{method}{path}").strip("_")
        spec.path(path=path, operations=operations, parameters=parameters)
    return spec.to_dict()


def path_schema(name: str) -> dict[str, Any]:
    """A path parameter's schema; the proxied `path` may be empty."""
    return {"type": "string"} if name == "path" else {"type": "string", "minLength": 1}


def field_properties(self: Any, field: fields.Field, ret: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
    """The bounds of the gateway's own field types, and patterns in JSON Schema's regex dialect."""
    found: dict[str, Any] = {}
    if isinstance(field, Port):
        found = {"minimum": 1, "maximum": 65535, "description": f"{WHOLE_NUMBER}, or a string of its digits"}
    elif isinstance(field, Count):
        found = {"minimum": field.low, "maximum": field.high, "description": WHOLE_NUMBER}
    elif isinstance(field, Gigabytes):
        found = {"exclusiveMinimum": 0, "maximum": MAX_MODEL_GB}
    elif isinstance(field, Seconds):
        found = {"minimum": field.low, "maximum": field.high}
    elif isinstance(field, Name):  # its check is in code, not a Regexp validator apispec could read
        found = {"pattern": ecma_pattern(NAME_PATTERN.pattern)}
    elif isinstance(field, fields.Dict):
        if isinstance(field.key_field, Name):
            found["propertyNames"] = {"pattern": ecma_pattern(NAME_PATTERN.pattern)}
        # apispec gives a Length validator's bounds as maxLength, which says nothing of an object
        for bound in ("minLength", "maxLength"):
            if bound in ret:
                found[bound.replace("Length", "Properties")] = ret.pop(bound)
    if "pattern" in ret:
        found["pattern"] = ecma_pattern(ret["pattern"])
    return found


def ecma_pattern(pattern: str) -> str:
    """A whole-string Python pattern in ECMA 262's dialect, which JSON Schema uses: ^ and $ for \\A and \\Z.

    A range of lone surrogates is dropped: a JSON Schema validator's strings cannot hold one, and
    the gateway refuses them itself.
    """
    return pattern.replace(r"\A", "^").replace(r"\Z", "$").replace(r"\ud800-\udfff", "")


def init_app(app: Flask) -> None:
    """Add /openapi.json and build its document; call after every other route is added."""
    app.register_blueprint(bp)
    app.extensions["openapi"] = json.dumps(build_spec(app), ensure_ascii=False)
