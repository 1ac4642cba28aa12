"""Seed 001's server fields at registration and in /admin: model_memory_gb, type, description, skip_resource_check."""

from __future__ import annotations

import json

import pytest
from conftest import SECRET

from gateway.api.server_replies import ServerListReplySchema

ADMIN = {"X-Webhook-Secret": SECRET}
FIELDS = {
    "model_memory_gb": {"qwen3:14b": 24, "llama3": 7.5},
    "type": "cpu",
    "description": "the spare box under the desk: 64 GB of RAM, no GPU",
    "skip_resource_check": True,
}


def register(client, **options):
    body = {"server_id": "B1", "ip": "127.0.0.1", "port": 8000, "secret": SECRET, **options}
    return client.post("/webhook/register", json=body)


def row(client) -> dict:
    reply = client.get("/admin/servers", headers=ADMIN)
    assert ServerListReplySchema().validate(reply.get_json()) == {}
    (server,) = reply.get_json()["data"]["servers"]
    return server


def test_a_registration_declares_them_and_the_server_list_shows_them(client, manager):
    reply = register(client, **FIELDS)

    assert reply.status_code == 200, reply.get_data(as_text=True)
    assert {name: reply.get_json()[name] for name in FIELDS} == FIELDS
    assert {name: row(client)[name] for name in FIELDS} == FIELDS
    assert row(client)["loaded_models"] == []
    server = manager.get_server("B1")
    assert (server.type, server.skip_resource_check, server.model_memory_gb) == ("cpu", True, FIELDS["model_memory_gb"])


def test_without_them_a_server_is_a_gpu_box_filtered_by_its_readings(client):
    register(client)

    assert {name: row(client)[name] for name in FIELDS} == {
        "model_memory_gb": {},
        "type": "gpu",
        "description": "",
        "skip_resource_check": False,
    }


@pytest.mark.parametrize(("sent", "kept"), [("GPU", "gpu"), ("CPU", "cpu"), ("gpu", "gpu")])
def test_the_seeds_upper_case_type_is_taken_and_kept_in_lower_case(client, sent, kept):
    assert register(client, type=sent).get_json()["type"] == kept
    assert row(client)["type"] == kept


def test_the_operator_sets_them_and_a_heartbeat_keeps_what_it_set(client, manager):
    register(client, **FIELDS)
    change = {"skip_resource_check": False, "model_memory_gb": {"qwen3:14b": 30}, "description": ""}

    assert client.patch("/admin/servers/B1", json=change, headers=ADMIN).status_code == 200
    reply = register(client, **FIELDS)  # the server's agent, registering again as it does every 30 s

    assert sorted(reply.get_json()["kept_by_operator"]) == sorted(change)
    assert {name: row(client)[name] for name in FIELDS} == {**FIELDS, **change}
    assert set(change) <= set(row(client)["operator_options"])


def test_the_admin_api_registers_with_them(client):
    body = {"server_id": "B1", "ip": "127.0.0.1", "port": 8000, **FIELDS, "type": "GPU"}

    reply = client.post("/admin/servers", json=body, headers=ADMIN)

    assert reply.status_code == 201, reply.get_data(as_text=True)
    assert {name: reply.get_json()["data"][name] for name in FIELDS} == {**FIELDS, "type": "gpu"}


def test_they_survive_a_restart(make_app, client, app):
    register(client, **FIELDS)
    app.extensions["gateway_shutdown"]()

    again = make_app(backend_servers_file=app.config["GATEWAY"].backend_servers_file)

    server = again.extensions["backend_manager"].get_server("B1")
    assert {name: getattr(server, name) for name in FIELDS} == FIELDS


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("model_memory_gb", {"m": 0}),
        ("model_memory_gb", {"m": "24"}),
        ("type", "tpu"),
        ("description", "x" * 1001),
        ("skip_resource_check", "yes"),
    ],
)
def test_a_bad_entry_in_the_state_file_is_set_aside(make_app, tmp_path, field, value):
    path = tmp_path / "fleet.json"
    entry = {"server_id": "B1", "ip": "127.0.0.1", "port": 8000, field: value}
    path.write_text(json.dumps([{"server_id": "B2", "ip": "127.0.0.1", "port": 8001}, entry]))

    app = make_app(backend_servers_file=str(path))

    assert [s.server_id for s in app.extensions["backend_manager"].list_servers()] == ["B2"]
