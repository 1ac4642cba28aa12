"""The admin API: who may call it, what it validates, what it changes and keeps, and draining over HTTP."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import requests
from conftest import SECRET

from gateway.api.webhook import MAX_BODY_BYTES

ADMIN = "admin-token-0d6f3b8e91c24a"
ADMIN_AUTH = {"Authorization": f"Bearer {ADMIN}"}
B1 = {"server_id": "B1", "ip": "127.0.0.1", "port": 9001}


@pytest.fixture
def app(make_app):
    """A gateway with ADMIN_TOKEN set."""
    return make_app(admin_token=ADMIN)


@pytest.fixture
def registered(client, app):
    """B1 registered through the admin API; returns the state file's bytes as they were."""
    response = client.post("/admin/servers", json={**B1, "models": ["m1"]}, headers=ADMIN_AUTH)
    assert response.status_code == 201, response.get_data(as_text=True)
    return state_bytes(app)


def state_bytes(app) -> bytes | None:
    path = Path(app.config["GATEWAY"].backend_servers_file)
    return path.read_bytes() if path.exists() else None


def stored(app) -> list[dict]:
    return json.loads(state_bytes(app) or b"[]")


def assert_error(response, status: int) -> dict:
    """Check the one error shape and return the body."""
    assert response.status_code == status, response.get_data(as_text=True)
    body = response.get_json()
    assert set(body) == {"success", "message", "errors"}
    assert body["success"] is False
    assert body["message"]
    return body


def assert_no_credential(response) -> None:
    text = response.get_data(as_text=True) + str(response.headers)
    assert ADMIN not in text
    assert SECRET not in text


# -- who may call it ----------------------------------------------------------------------

# Every admin endpoint (and /status, which takes the same credential), with a call that succeeds.
ENDPOINTS = [
    pytest.param("get", "/admin/servers", None, 200, id="list"),
    pytest.param("post", "/admin/servers", {"server_id": "B2", "ip": "127.0.0.1", "port": 9002}, 201, id="add"),
    pytest.param("get", "/admin/servers/B1", None, 200, id="get"),
    pytest.param("patch", "/admin/servers/B1", {"weight": 7}, 200, id="patch"),
    pytest.param("put", "/admin/servers/B1", {"weight": 7}, 200, id="put"),
    pytest.param("delete", "/admin/servers/B1", None, 200, id="delete"),
    pytest.param("post", "/admin/servers/B1/drain", None, 200, id="drain"),
    pytest.param("post", "/admin/servers/B1/enable", None, 200, id="enable"),
    pytest.param("post", "/admin/servers/B1/reset-token", None, 200, id="reset-token"),
    pytest.param("get", "/admin/server-priority/check/m1", None, 200, id="priority-check"),
    pytest.param("get", "/admin/server-priority/overview", None, 200, id="priority-overview"),
    pytest.param("get", "/admin/rankings", None, 200, id="rankings"),
    pytest.param("get", "/status", None, 200, id="status"),
]

REFUSED_WITH_ADMIN_TOKEN = [
    pytest.param({}, "", id="no-credential"),
    pytest.param({"Authorization": "Bearer wrong"}, "", id="wrong-token"),
    pytest.param({"Authorization": f"Bearer {ADMIN[:-1]}"}, "", id="token-prefix"),
    pytest.param({"Authorization": f"Bearer {ADMIN}x"}, "", id="token-longer"),
    pytest.param({"Authorization": f"Basic {ADMIN}"}, "", id="basic-scheme"),
    pytest.param({"Authorization": ADMIN}, "", id="no-scheme"),
    pytest.param({"X-Webhook-Secret": ADMIN}, "", id="token-in-x-webhook-secret"),
    pytest.param({"X-Webhook-Secret": SECRET}, "", id="webhook-secret-header"),
    pytest.param({"Authorization": f"Bearer {SECRET}"}, "", id="webhook-secret-bearer"),
    pytest.param({}, f"?secret={ADMIN}", id="token-in-query-secret"),
    pytest.param({}, f"?token={ADMIN}", id="token-in-query-token"),
    pytest.param({}, f"?admin_token={ADMIN}", id="token-in-query-admin-token"),
]


@pytest.mark.parametrize(("headers", "query"), REFUSED_WITH_ADMIN_TOKEN)
@pytest.mark.parametrize(("method", "path", "body", "ok"), ENDPOINTS)
def test_with_admin_token_set_only_its_bearer_opens(client, app, registered, method, path, body, ok, headers, query):
    before = state_bytes(app)

    response = getattr(client, method)(path + query, json=body, headers=headers)

    assert "ADMIN_TOKEN" in assert_error(response, 401)["message"]
    assert_no_credential(response)
    assert state_bytes(app) == before
    assert [server.server_id for server in app.extensions["backend_manager"].list_servers()] == ["B1"]


@pytest.mark.parametrize(("method", "path", "body", "ok"), ENDPOINTS)
def test_the_admin_token_as_a_bearer_opens_every_endpoint(client, registered, method, path, body, ok):
    response = getattr(client, method)(path, json=body, headers=ADMIN_AUTH)

    assert response.status_code == ok, response.get_data(as_text=True)
    assert response.get_json()["success"] is True
    assert_no_credential(response)


@pytest.mark.parametrize(
    "headers",
    [{"X-Webhook-Secret": SECRET}, {"Authorization": f"Bearer {SECRET}"}],
    ids=["x-webhook-secret", "bearer"],
)
@pytest.mark.parametrize(("method", "path", "body", "ok"), ENDPOINTS)
def test_without_admin_token_the_webhook_secret_opens(make_app, method, path, body, ok, headers):
    client = make_app().test_client()  # ADMIN_TOKEN unset
    client.post("/admin/servers", json={**B1, "models": ["m1"]}, headers=headers)

    response = getattr(client, method)(path, json=body, headers=headers)

    assert response.status_code == ok, response.get_data(as_text=True)
    assert_no_credential(response)


@pytest.mark.parametrize(
    ("headers", "query", "body_secret"),
    [
        pytest.param({}, "", {}, id="none"),
        pytest.param({"X-Webhook-Secret": "wrong"}, "", {}, id="wrong"),
        pytest.param({}, f"?secret={SECRET}", {}, id="query"),
        pytest.param({}, "", {"secret": SECRET}, id="body"),
    ],
)
@pytest.mark.parametrize(("method", "path", "body", "ok"), ENDPOINTS)
def test_without_admin_token_the_secret_elsewhere_is_refused(
    make_app, method, path, body, ok, headers, query, body_secret
):
    client = make_app().test_client()

    response = getattr(client, method)(path + query, json={**(body or {}), **body_secret} or None, headers=headers)

    assert_error(response, 401)
    assert_no_credential(response)


# -- the fleet ------------------------------------------------------------------------------


def test_list_is_describe_servers(client, manager, registered):
    response = client.get("/admin/servers", headers=ADMIN_AUTH)

    assert response.get_json() == {"success": True, "data": {"servers": manager.describe_servers()}}


def test_get_one_is_its_row_of_describe_servers(client, manager, registered):
    response = client.get("/admin/servers/B1", headers=ADMIN_AUTH)

    body = response.get_json()
    assert body == {"success": True, "data": manager.describe_servers()[0]}
    assert body["data"]["models"] == ["m1"]
    for key in ("in_flight", "ejected", "ejection_seconds_left", "effective_weight", "served_models", "resources"):
        assert key in body["data"]


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("get", "/admin/servers/B9"),
        ("delete", "/admin/servers/B9"),
        ("post", "/admin/servers/B9/drain"),
        ("post", "/admin/servers/B9/enable"),
    ],
)
def test_an_unknown_server_is_a_404_naming_it(client, app, registered, method, path):
    response = getattr(client, method)(path, headers=ADMIN_AUTH)

    assert "B9" in assert_error(response, 404)["message"]
    assert state_bytes(app) == registered


@pytest.mark.parametrize("method", ["patch", "put"])
def test_updating_an_unknown_server_is_a_404_naming_it(client, app, registered, method):
    response = getattr(client, method)("/admin/servers/B9", json={"weight": 2}, headers=ADMIN_AUTH)

    assert "B9" in assert_error(response, 404)["message"]
    assert state_bytes(app) == registered


# -- registering through the admin API -----------------------------------------------------


def test_add_creates_with_201_then_updates_with_200(client, app, manager):
    body = {**B1, "weight": 5, "priority": 2, "max_concurrent": 4, "models": ["m1"], "labels": {"zone": "a"}}

    created = client.post("/admin/servers", json=body, headers=ADMIN_AUTH)
    again = client.post("/admin/servers", json={**B1, "port": 9009}, headers=ADMIN_AUTH)

    assert created.status_code == 201
    assert created.headers["Location"] == "/admin/servers/B1"
    assert "registered" in created.get_json()["message"]
    assert created.get_json()["data"]["weight"] == 5
    assert again.status_code == 200
    assert "updated" in again.get_json()["message"]
    server = manager.get_server("B1")
    assert (server.port, server.weight, server.priority, server.max_concurrent) == (9009, 5, 2, 4)  # options kept
    assert server.labels == {"zone": "a"}
    (entry,) = stored(app)
    assert (entry["port"], entry["weight"], entry["priority"], entry["labels"]) == (9009, 5, 2, {"zone": "a"})


def test_add_takes_a_monitor_port(client, manager):
    response = client.post("/admin/servers", json={**B1, "monitor_port": 8006}, headers=ADMIN_AUTH)

    assert response.status_code == 201
    assert manager.get_server("B1").monitor_url == "http://127.0.0.1:8006"


def test_add_refuses_the_gateways_own_address(client, manager):
    body = {"server_id": "GW", "ip": "127.0.0.1", "port": 8080}

    response = client.post("/admin/servers", json=body, headers=ADMIN_AUTH, environ_overrides={"SERVER_PORT": "8080"})

    assert "own address" in assert_error(response, 400)["errors"]["ip"][0]
    assert manager.list_servers() == []


def test_add_past_max_servers_is_507(make_app):
    client = make_app(admin_token=ADMIN, max_servers=1).test_client()
    assert client.post("/admin/servers", json=B1, headers=ADMIN_AUTH).status_code == 201

    response = client.post("/admin/servers", json={**B1, "server_id": "B2"}, headers=ADMIN_AUTH)

    assert "MAX_SERVERS=1" in assert_error(response, 507)["message"]


def test_add_holds_to_allowed_backend_networks(make_app):
    import ipaddress

    app = make_app(admin_token=ADMIN, allowed_backend_networks=(ipaddress.ip_network("10.0.0.0/8"),))

    response = app.test_client().post("/admin/servers", json=B1, headers=ADMIN_AUTH)

    assert "ALLOWED_BACKEND_NETWORKS" in assert_error(response, 400)["errors"]["ip"][0]
    assert app.extensions["backend_manager"].list_servers() == []


BAD_ADD = [
    pytest.param({"server_id": "B 2"}, "server_id", id="server-id"),
    pytest.param({"ip": "169.254.169.254"}, "ip", id="metadata-ip"),
    pytest.param({"ip": "not an address"}, "ip", id="ip-words"),
    pytest.param({"port": 0}, "port", id="port"),
    pytest.param({"monitor_url": "ftp://h:1"}, "monitor_url", id="monitor-url"),
    pytest.param({"monitor_port": 8006, "monitor_url": "http://127.0.0.1:8006"}, "monitor_port", id="both-monitors"),
    pytest.param({"weight": 0}, "weight", id="weight"),
    pytest.param({"priority": 101}, "priority", id="priority"),
    pytest.param({"max_concurrent": -1}, "max_concurrent", id="max-concurrent"),
    pytest.param({"models": "m1"}, "models", id="models"),
    pytest.param({"model_map": {"a": ""}}, "model_map", id="model-map"),
    pytest.param({"labels": {"k": 5}}, "labels", id="labels"),
    pytest.param({"gpu_count": 4}, "gpu_count", id="unknown-field"),
    pytest.param({"secret": SECRET}, "secret", id="secret-in-the-body"),
    pytest.param({"server_token": "x" * 43}, "server_token", id="server-token-in-the-body"),
]


@pytest.mark.parametrize(("change", "field"), BAD_ADD)
def test_add_refuses_a_bad_body_naming_the_field(client, app, manager, registered, change, field):
    response = client.post("/admin/servers", json={**B1, "server_id": "B2", **change}, headers=ADMIN_AUTH)

    body = assert_error(response, 400)
    assert field in body["errors"]
    assert field in body["message"]
    assert_no_credential(response)
    assert [server.server_id for server in manager.list_servers()] == ["B1"]
    assert state_bytes(app) == registered


# -- what the operator set, registrations keep ------------------------------------------------


def webhook_register(client, **fields):
    body = {**B1, "secret": SECRET, **fields}
    return client.post("/webhook/register", json=body)


def test_a_registration_keeps_the_options_the_operator_set(client, app, manager, registered):
    assert (
        client.patch("/admin/servers/B1", json={"weight": 50, "max_concurrent": 4}, headers=ADMIN_AUTH).status_code
        == 200
    )
    assert client.post("/admin/servers/B1/drain", headers=ADMIN_AUTH).status_code == 200

    # Anyone holding the webhook secret re-registers B1 at a new address, with options of their own.
    response = webhook_register(
        client, ip="127.0.0.2", port=9666, weight=1000, max_concurrent=0, priority=1, models=["evil"], labels={"a": "b"}
    )

    assert response.status_code == 200, response.get_data(as_text=True)
    body = response.get_json()
    assert body["kept_by_operator"] == ["weight", "max_concurrent", "models"]
    assert (body["weight"], body["max_concurrent"], body["models"]) == (50, 4, ["m1"])
    server = manager.get_server("B1")
    assert (server.weight, server.max_concurrent, server.models, server.draining) == (50, 4, ["m1"], True)
    assert (server.ip, server.port, server.priority, server.labels) == ("127.0.0.2", 9666, 1, {"a": "b"})
    (entry,) = stored(app)
    assert (entry["weight"], entry["max_concurrent"], entry["models"]) == (50, 4, ["m1"])
    assert entry["operator_options"] == ["weight", "max_concurrent", "models"]


def test_a_registration_names_no_kept_option_when_the_operator_set_none(client):
    response = webhook_register(client, weight=3)

    assert response.get_json()["kept_by_operator"] == []
    assert response.get_json()["weight"] == 3


def test_the_operator_may_change_what_it_holds(client, manager, registered):
    client.patch("/admin/servers/B1", json={"weight": 50}, headers=ADMIN_AUTH)
    client.patch("/admin/servers/B1", json={"weight": 60, "labels": {"zone": "eu"}}, headers=ADMIN_AUTH)

    webhook_register(client, weight=1, labels={})

    server = manager.get_server("B1")
    assert (server.weight, server.labels) == (60, {"zone": "eu"})
    assert server.operator_options == ["weight", "models", "labels"]


def test_what_the_operator_holds_survives_a_restart(make_config, make_app):
    config = make_config(admin_token=ADMIN)
    client = make_app(config).test_client()
    client.post("/admin/servers", json={**B1, "priority": 2}, headers=ADMIN_AUTH)

    restarted = make_app(config).test_client()
    response = webhook_register(restarted, priority=1)

    assert response.get_json()["kept_by_operator"] == ["priority"]
    assert response.get_json()["priority"] == 2


def test_a_heartbeat_that_names_a_kept_option_writes_nothing(client, app, registered):
    client.patch("/admin/servers/B1", json={"weight": 50}, headers=ADMIN_AUTH)
    before = state_bytes(app)

    response = webhook_register(client, weight=1)

    assert response.get_json()["kept_by_operator"] == ["weight"]
    assert state_bytes(app) == before


# -- server tokens (REGISTRATION_BINDING=token) -------------------------------------------------


@pytest.fixture
def bound_client(make_app):
    """A gateway with ADMIN_TOKEN and REGISTRATION_BINDING=token, B1 registered; its client and B1's token."""
    client = make_app(admin_token=ADMIN, registration_binding="token").test_client()
    token = webhook_register(client).get_json()["server_token"]
    return client, token


def test_reset_token_lets_the_next_registration_bind_a_new_one(bound_client):
    client, old = bound_client

    response = client.post("/admin/servers/B1/reset-token", headers=ADMIN_AUTH)

    assert response.status_code == 200
    assert "next registration binds a new one" in response.get_json()["message"]
    assert response.get_json()["data"]["token_bound"] is False
    new = webhook_register(client, port=9002).get_json()["server_token"]
    assert new != old
    assert old not in response.get_data(as_text=True)
    assert "wrong" in assert_error(webhook_register(client, server_token=old), 403)["message"]
    assert webhook_register(client, server_token=new).status_code == 200


def test_reset_token_of_an_unknown_server_is_404(bound_client):
    client, _ = bound_client

    assert "B9" in assert_error(client.post("/admin/servers/B9/reset-token", headers=ADMIN_AUTH), 404)["message"]


def test_the_operator_needs_no_server_token(bound_client):
    client, token = bound_client

    assert client.patch("/admin/servers/B1", json={"weight": 5}, headers=ADMIN_AUTH).status_code == 200
    assert client.post("/admin/servers", json={**B1, "port": 9005}, headers=ADMIN_AUTH).status_code == 200
    assert webhook_register(client, port=9005, server_token=token).status_code == 200  # still bound to it
    assert client.delete("/admin/servers/B1", headers=ADMIN_AUTH).status_code == 200


# -- changing a server's options -------------------------------------------------------------


@pytest.mark.parametrize("method", ["patch", "put"])
def test_update_changes_only_what_it_names_and_saves_it(client, app, manager, registered, method):
    response = getattr(client, method)(
        "/admin/servers/B1", json={"weight": 30, "labels": {"gpu": "a100"}}, headers=ADMIN_AUTH
    )

    assert response.status_code == 200, response.get_data(as_text=True)
    body = response.get_json()
    assert body["data"]["weight"] == 30
    assert body["data"]["labels"] == {"gpu": "a100"}
    assert body["data"]["models"] == ["m1"]  # untouched
    assert "weight" in body["message"] and "labels" in body["message"]
    server = manager.get_server("B1")
    assert (server.weight, server.priority, server.models, server.labels) == (30, 1, ["m1"], {"gpu": "a100"})
    (entry,) = stored(app)
    assert (entry["weight"], entry["labels"], entry["models"]) == (30, {"gpu": "a100"}, ["m1"])


def test_every_option_can_be_set(client, manager, registered):
    options = {
        "weight": 1000,
        "priority": 100,
        "max_concurrent": 100_000,
        "models": ["a", "b"],
        "model_map": {"qwen3": "qwen3:14b"},
        "labels": {"zone": ""},
        "model_memory_gb": {"qwen3:14b": 100_000, "a": 0.5},
        "type": "cpu",
        "description": "d" * 1000,
        "skip_resource_check": True,
        "max_allocations": 1_000_000,
    }

    response = client.patch("/admin/servers/B1", json=options, headers=ADMIN_AUTH)

    assert response.status_code == 200, response.get_data(as_text=True)
    assert manager.get_server("B1").options() == options


BAD_OPTIONS = [
    *[pytest.param({"weight": v}, "weight", id=f"weight-{v!r}") for v in (0, 1001, -1, "5", True, 2.5, None)],
    *[pytest.param({"priority": v}, "priority", id=f"priority-{v!r}") for v in (0, 101, "1", False, 1.0, None)],
    *[
        pytest.param({"max_concurrent": v}, "max_concurrent", id=f"max-concurrent-{v!r}")
        for v in (-1, 100_001, "0", True, None)
    ],
    *[
        pytest.param({"max_allocations": v}, "max_allocations", id=f"max-allocations-{v!r}")
        for v in (-1, 1_000_001, "0", True, 1.5, None)
    ],
    *[
        pytest.param({"models": v}, "models", id=f"models-{v!r}")
        for v in ("m1", [""], ["a b"], ["a\x85b"], ["\ufeffm"], [1], ["x" * 201], {"a": "b"}, None, ["m"] * 257)
    ],
    *[
        pytest.param({"model_map": v}, "model_map", id=f"model-map-{str(v)[:20]}")
        for v in ({"a": ""}, {"": "b"}, {"a b": "c"}, {"a": 1}, ["a"], "a=b", None)
    ],
    *[
        pytest.param({"labels": v}, "labels", id=f"labels-{str(v)[:20]}")
        for v in ({"k": 5}, {"": "v"}, {"k": "v" * 201}, ["k"], None, {f"k{i}": "v" for i in range(65)})
    ],
    *[
        pytest.param({"model_memory_gb": v}, "model_memory_gb", id=f"model-memory-gb-{str(v)[:20]}")
        for v in (
            {"m": 0},
            {"m": -1},
            {"m": 100_001},
            {"m": "24"},
            {"m": True},
            {"m": None},
            {"a b": 1},
            {"": 1},
            [24],
            24,
            None,
            {f"m{i}": 1 for i in range(257)},
        )
    ],
    *[pytest.param({"type": v}, "type", id=f"type-{v!r}") for v in ("tpu", "Gpu", "", 1, None, ["gpu"])],
    *[pytest.param({"description": v}, "description", id=f"description-{str(v)[:8]}") for v in ("d" * 1001, 5, None)],
    *[
        pytest.param({"skip_resource_check": v}, "skip_resource_check", id=f"skip-resource-check-{v!r}")
        for v in (1, 0, "true", "yes", None)
    ],
    *[pytest.param({name: 1}, name, id=f"unknown-{name}") for name in ("ip", "port", "server_id", "draining", "x")],
    *[pytest.param({name: []}, name, id=f"not-an-option-{name}") for name in ("loaded_models", "discovered_models")],
    pytest.param({"secret": SECRET}, "secret", id="secret"),
    pytest.param({"weight": 5, "nope": 1}, "nope", id="good-and-unknown"),
]


@pytest.mark.parametrize("method", ["patch", "put"])
@pytest.mark.parametrize(("change", "field"), BAD_OPTIONS)
def test_a_bad_update_is_400_naming_the_field_and_changes_nothing(
    client, app, manager, registered, method, change, field
):
    before = manager.get_server("B1")

    response = getattr(client, method)("/admin/servers/B1", json=change, headers=ADMIN_AUTH)

    body = assert_error(response, 400)
    assert field in body["errors"], body
    assert field in body["message"]
    assert_no_credential(response)
    assert manager.get_server("B1") == before
    assert state_bytes(app) == registered


@pytest.mark.parametrize(
    "kwargs",
    [
        pytest.param({"json": {}}, id="empty-object"),
        pytest.param({"data": "", "content_type": "application/json"}, id="no-body"),
        pytest.param({"data": "{", "content_type": "application/json"}, id="not-json"),
        pytest.param({"data": '{"weight": 2}', "content_type": "text/plain"}, id="not-json-content-type"),
        pytest.param({"json": [{"weight": 2}]}, id="array"),
        pytest.param({"json": None}, id="null"),
    ],
)
def test_an_update_without_changes_is_400(client, app, manager, registered, kwargs):
    before = manager.get_server("B1")

    response = client.patch("/admin/servers/B1", headers=ADMIN_AUTH, **kwargs)

    assert_error(response, 400)
    assert manager.get_server("B1") == before
    assert state_bytes(app) == registered


def test_an_empty_update_says_what_may_be_changed(client, registered):
    body = assert_error(client.patch("/admin/servers/B1", json={}, headers=ADMIN_AUTH), 400)

    assert "weight" in body["message"] and "labels" in body["message"]


@pytest.mark.parametrize(("method", "path"), [("patch", "/admin/servers/B1"), ("post", "/admin/servers")])
def test_a_body_over_64_kib_is_413(client, app, registered, method, path):
    data = json.dumps({"labels": {"k": "v"}}).encode() + b" " * MAX_BODY_BYTES

    response = getattr(client, method)(path, data=data, content_type="application/json", headers=ADMIN_AUTH)

    assert_error(response, 413)
    assert state_bytes(app) == registered


def test_changes_survive_a_restart(make_config, make_app):
    config = make_config(admin_token=ADMIN)
    client = make_app(config).test_client()
    client.post("/admin/servers", json=B1, headers=ADMIN_AUTH)
    options = {"weight": 9, "priority": 3, "max_concurrent": 2, "models": ["m"], "model_map": {"v": "m"}}
    assert client.patch("/admin/servers/B1", json=options, headers=ADMIN_AUTH).status_code == 200
    assert client.post("/admin/servers/B1/drain", headers=ADMIN_AUTH).status_code == 200

    restarted = make_app(config).test_client()

    data = restarted.get("/admin/servers/B1", headers=ADMIN_AUTH).get_json()["data"]
    assert {name: data[name] for name in options} == options
    assert data["draining"] is True


def test_delete_unregisters_and_saves(client, app, manager, registered):
    response = client.delete("/admin/servers/B1", headers=ADMIN_AUTH)

    assert response.get_json() == {"success": True, "message": "server B1 unregistered", "server_id": "B1"}
    assert manager.list_servers() == []
    assert stored(app) == []
    assert_error(client.delete("/admin/servers/B1", headers=ADMIN_AUTH), 404)


# -- draining -------------------------------------------------------------------------------


def test_drain_and_enable_are_idempotent_and_saved(client, app, manager, registered):
    first = client.post("/admin/servers/B1/drain", headers=ADMIN_AUTH)
    saved = state_bytes(app)
    second = client.post("/admin/servers/B1/drain", headers=ADMIN_AUTH)

    assert (first.status_code, second.status_code) == (200, 200)
    assert second.get_json()["data"]["draining"] is True
    assert "draining" in second.get_json()["message"]
    assert state_bytes(app) == saved  # nothing changed the second time
    assert stored(app)[0]["draining"] is True

    for _ in range(2):
        enabled = client.post("/admin/servers/B1/enable", headers=ADMIN_AUTH)
        assert enabled.status_code == 200
        assert enabled.get_json()["data"]["draining"] is False
    assert stored(app)[0]["draining"] is False
    assert manager.get_server("B1").draining is False


def test_a_drained_server_takes_no_new_requests_until_enabled(live_gateway, fake_servers):
    gateway = live_gateway(admin_token=ADMIN)
    b1, b2 = fake_servers("B1"), fake_servers("B2")
    gateway.register(b1)
    gateway.register(b2)

    def served_by(count: int) -> list[str]:
        return [requests.get(gateway.url + "/api/echo", timeout=5).headers["X-Backend-Server"] for _ in range(count)]

    assert set(served_by(4)) == {"B1", "B2"}
    drained = requests.post(gateway.url + "/admin/servers/B1/drain", headers=ADMIN_AUTH, timeout=5)
    assert drained.status_code == 200
    hits_before = len(b1.requests)

    assert served_by(6) == ["B2"] * 6
    assert [r for r in b1.requests[hits_before:] if r["path"].startswith("/api/")] == []

    enabled = requests.post(gateway.url + "/admin/servers/B1/enable", headers=ADMIN_AUTH, timeout=5)
    assert enabled.status_code == 200
    assert "B1" in served_by(4)


def test_a_drained_server_still_gets_its_tasks(live_gateway, fake_servers):
    gateway = live_gateway(admin_token=ADMIN)
    b1, b2 = fake_servers("B1"), fake_servers("B2")
    gateway.register(b1)
    gateway.register(b2)
    created = requests.post(gateway.url + "/api/enhance", data=b"img", timeout=5)
    owner, task_id = created.headers["X-Backend-Server"], created.json()["task_id"]

    requests.post(f"{gateway.url}/admin/servers/{owner}/drain", headers=ADMIN_AUTH, timeout=5).raise_for_status()

    status = requests.get(f"{gateway.url}/api/status/{task_id}", timeout=5)
    assert (status.status_code, status.headers["X-Backend-Server"]) == (200, owner)
    new_work = requests.post(gateway.url + "/api/enhance", data=b"img", timeout=5)
    assert new_work.headers["X-Backend-Server"] != owner


# -- when a change cannot be saved ----------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("post", "/admin/servers", {"server_id": "B2", "ip": "127.0.0.1", "port": 9002}),
        ("patch", "/admin/servers/B1", {"weight": 4}),
        ("put", "/admin/servers/B1", {"priority": 2}),
        ("delete", "/admin/servers/B1", None),
        ("post", "/admin/servers/B1/drain", None),
    ],
)
def test_a_change_that_cannot_be_saved_is_503_and_undone(client, manager, registered, monkeypatch, method, path, body):
    before = manager.list_servers()

    def fail(entries):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(manager.store, "save", fail)

    response = getattr(client, method)(path, json=body, headers=ADMIN_AUTH)

    assert "No space left on device" in assert_error(response, 503)["message"]
    assert response.headers["Retry-After"] == "5"
    assert manager.list_servers() == before


def test_enable_that_cannot_be_saved_is_503(client, manager, registered, monkeypatch):
    client.post("/admin/servers/B1/drain", headers=ADMIN_AUTH)

    def fail(entries):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(manager.store, "save", fail)

    response = client.post("/admin/servers/B1/enable", headers=ADMIN_AUTH)

    assert_error(response, 503)
    assert manager.get_server("B1").draining is True


# -- priority tiers --------------------------------------------------------------------------


@pytest.mark.parametrize("model", ["m1", "qwen3:14b", "org/model-7b", "unknown-model"])
def test_priority_check_is_the_managers(client, manager, registered, model):
    client.patch("/admin/servers/B1", json={"models": ["m1", "qwen3:14b", "org/model-7b"]}, headers=ADMIN_AUTH)

    response = client.get(f"/admin/server-priority/check/{model}", headers=ADMIN_AUTH)

    assert response.status_code == 200
    assert response.get_json() == {"success": True, "data": manager.priority_check(model)}
    assert response.get_json()["data"]["known"] is (model != "unknown-model")


def test_priority_check_shows_a_drained_server_and_the_serving_tier(client, registered):
    client.post("/admin/servers", json={**B1, "server_id": "B2", "priority": 2, "models": ["m1"]}, headers=ADMIN_AUTH)
    client.post("/admin/servers/B1/drain", headers=ADMIN_AUTH)

    data = client.get("/admin/server-priority/check/m1", headers=ADMIN_AUTH).get_json()["data"]

    assert data["serving_tier"] == 2
    states = {row["server_id"]: row["state"] for tier in data["tiers"] for row in tier["servers"]}
    assert states == {"B1": "draining", "B2": "available"}


def test_priority_overview_is_the_managers(client, manager, registered):
    client.post("/admin/servers", json={**B1, "server_id": "B2", "priority": 2}, headers=ADMIN_AUTH)

    response = client.get("/admin/server-priority/overview", headers=ADMIN_AUTH)

    assert response.get_json() == {"success": True, "data": manager.priority_overview()}
    assert [tier["priority"] for tier in response.get_json()["data"]["tiers"]] == [1, 2]
