"""GET /openapi.json: a valid OpenAPI 3.1 document of every route, built once per app."""

from __future__ import annotations

import jsonschema_rs
import pytest
import schemathesis

from gateway import __version__
from gateway.api import openapi
from gateway.api.schemas import NAME_PATTERN

# Pages, form posts and files for a browser, not an API; the dashboard's JSON (/dashboard/data) is described.
UNDESCRIBED = {"static", "dashboard.page", "dashboard.login", "dashboard.logout"}
ERROR_REF = {"$ref": "#/components/schemas/Error"}


def document(client) -> dict:
    response = client.get("/openapi.json")
    assert response.status_code == 200
    assert response.is_json
    return response.get_json()


def operations(spec: dict):
    """(path, method, operation) for every operation of the document."""
    for path, item in spec["paths"].items():
        for method, op in item.items():
            if method != "parameters":
                yield path, method, op


def test_the_document_is_valid_openapi_3_1(client):
    spec = document(client)

    assert spec["openapi"] == "3.1.0"
    assert spec["info"]["version"] == __version__
    schemathesis.openapi.from_dict(spec).validate()  # against the OpenAPI 3.1 meta-schema


def test_every_route_is_described_with_each_of_its_methods(app, client):
    described = {(path, method) for path, method, _ in operations(document(client))}

    for rule in app.url_map.iter_rules():
        if rule.endpoint in UNDESCRIBED:
            continue
        path = openapi.RULE_ARGUMENT.sub(r"{\1}", rule.rule)
        for method in (rule.methods or set()) - {"HEAD", "OPTIONS"}:
            assert (path, method.lower()) in described, f"{method} {rule.rule} ({rule.endpoint}) is not described"


def test_the_paths_follow_the_apps_configuration(make_app):
    spec = document(make_app(llm_routes=False, proxy_prefixes=("/gpu/",)).test_client())

    assert "/gpu/{path}" in spec["paths"]
    assert "/api/{path}" not in spec["paths"]
    assert not [path for path in spec["paths"] if path.startswith("/v1/")]


def test_path_parameters_are_declared(client):
    item = document(client)["paths"]["/admin/servers/{server_id}"]

    assert item["parameters"] == [
        {"name": "server_id", "in": "path", "required": True, "schema": item["parameters"][0]["schema"]}
    ]


def test_every_error_the_gateway_makes_refers_to_the_one_error_schema(client):
    spec = document(client)
    shared = spec["components"]["responses"]
    errors = 0
    for path, method, op in operations(spec):
        for status, response in op["responses"].items():
            if status == "default":
                continue  # a proxied answer, as the GPU server sent it
            if int(status) >= 400:
                name = response["$ref"].rsplit("/", 1)[1]
                assert shared[name]["content"]["application/json"]["schema"] == ERROR_REF, f"{method} {path} {status}"
                errors += 1
    assert errors > 20
    assert set(spec["components"]["schemas"]["Error"]["required"]) == {"success", "message", "errors"}


@pytest.mark.parametrize(
    ("path", "method", "schemes"),
    [
        ("/webhook/register", "post", [{"webhookSecret": []}, {"webhookBearer": []}]),
        ("/webhook/servers", "get", [{"webhookSecret": []}, {"webhookBearer": []}, {"webhookQuery": []}]),
        ("/admin/servers", "get", [{"adminToken": []}, {"webhookSecret": []}]),
        ("/status", "get", [{"adminToken": []}, {"webhookSecret": []}]),
        ("/metrics", "get", [{}, {"metricsToken": []}]),
        ("/workers/lease", "post", [{"workerToken": []}]),
        ("/jobs/{job_id}/complete", "post", [{"workerToken": []}]),
        ("/admin/workers", "get", [{"adminToken": []}, {"webhookSecret": []}]),
        ("/health", "get", []),
        ("/v1/chat/completions", "post", []),
    ],
)
def test_each_operation_names_its_credentials(client, path, method, schemes):
    spec = document(client)

    assert spec["paths"][path][method]["security"] == schemes
    for scheme in (name for requirement in schemes for name in requirement):
        assert scheme in spec["components"]["securitySchemes"]


def test_the_credential_schemes_say_where_each_goes(client):
    schemes = document(client)["components"]["securitySchemes"]

    assert schemes["webhookSecret"] == {
        **schemes["webhookSecret"],
        "type": "apiKey",
        "in": "header",
        "name": "X-Webhook-Secret",
    }
    assert "`secret`" in schemes["webhookSecret"]["description"]
    assert schemes["adminToken"]["type"] == "http" and schemes["adminToken"]["scheme"] == "bearer"
    assert "ADMIN_TOKEN" in schemes["adminToken"]["description"]


def test_the_registration_body_comes_from_its_marshmallow_schema(client):
    schemas = document(client)["components"]["schemas"]
    register, admin_register = schemas["Register"], schemas["AdminRegister"]

    assert set(register["required"]) == {"server_id", "ip", "port"}
    assert register["additionalProperties"] is False
    assert register["properties"]["port"]["maximum"] == 65535
    weight = register["properties"]["weight"]
    assert (weight["type"], weight["minimum"], weight["maximum"]) == ("integer", 1, 1000)
    assert "not 8000.0" in weight["description"]  # JSON Schema's integer cannot say it
    assert {"format": "hostname"} in register["properties"]["ip"]["anyOf"]
    assert register["properties"]["server_id"]["pattern"] == "^[A-Za-z0-9_.-]{1,64}$"  # ECMA 262, not \A...\Z
    assert register["properties"]["labels"]["maxProperties"] == 64
    assert register["properties"]["secret"]["writeOnly"] is True
    assert "secret" not in admin_register["properties"]  # the admin credential goes in a header


def test_a_name_pattern_means_the_same_in_json_schema_as_in_python(client):
    pattern = document(client)["components"]["schemas"]["ServerOptions"]["properties"]["models"]["items"]["pattern"]
    validator = jsonschema_rs.validator_for({"type": "string", "pattern": pattern})  # ECMA 262 regexes

    characters = (chr(c) for c in range(0x110000) if not 0xD800 <= c < 0xE000)
    differ = [hex(ord(ch)) for ch in characters if bool(NAME_PATTERN.fullmatch(ch)) != validator.is_valid(ch)]
    assert differ == []


def test_a_change_of_options_must_name_one(client):
    patch = document(client)["paths"]["/admin/servers/{server_id}"]["patch"]

    body = patch["requestBody"]["content"]["application/json"]["schema"]
    assert body == {"allOf": [{"$ref": "#/components/schemas/ServerOptions"}], "minProperties": 1}


def test_the_document_is_built_once_per_app(app, client, monkeypatch):
    first = client.get("/openapi.json").get_data()
    monkeypatch.setattr(openapi, "build_spec", lambda app: pytest.fail("built again on a request"))

    assert client.get("/openapi.json").get_data() == first
