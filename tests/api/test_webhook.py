"""The webhook API: register, unregister and the server list, through Flask's test client."""

from __future__ import annotations

import ipaddress
import json
from pathlib import Path

import pytest
import requests
from conftest import SECRET

from gateway.api.webhook import MAX_BODY_BYTES
from gateway.fleet.health import HealthResult

SEED_SERVER_FIELDS = {
    "server_id",
    "ip",
    "port",
    "url",
    "is_healthy",
    "fail_count",
    "last_check_time",
    "last_used_time",
}
AUTH = {"X-Webhook-Secret": SECRET}


def register(client, server_id="B1", ip="127.0.0.1", port=8000, **extra):
    """POST /webhook/register with the secret in the body, the seed's way."""
    body = {"server_id": server_id, "ip": ip, "port": port, "secret": SECRET, **extra}
    return client.post("/webhook/register", json=body)


def unregister(client, server_id, **extra):
    return client.post("/webhook/unregister", json={"server_id": server_id, "secret": SECRET, **extra})


def fleet(client):
    """The `data` of GET /webhook/servers."""
    response = client.get("/webhook/servers", headers=AUTH)
    assert response.status_code == 200, response.get_data(as_text=True)
    assert response.get_json()["success"] is True
    return response.get_json()["data"]


def servers(client):
    return fleet(client)["servers"]


def server_ids(client):
    return [server["server_id"] for server in servers(client)]


def state_path(app) -> Path:
    return Path(app.config["GATEWAY"].backend_servers_file)


def stored(app):
    """The entries in the state file, or None when it has never been written."""
    path = state_path(app)
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else None


def assert_error(response, status):
    """Check the one error shape and return the body."""
    assert response.status_code == status, response.get_data(as_text=True)
    assert response.is_json
    body = response.get_json()
    assert set(body) == {"success", "message", "errors"}
    assert body["success"] is False
    assert isinstance(body["message"], str)
    assert body["message"]
    return body


@pytest.fixture
def registered(client, app):
    """B1 at 127.0.0.1:8000, registered before the test; returns the list and file as they were."""
    assert register(client).status_code == 200
    return servers(client), stored(app)


# -- register: the happy path ------------------------------------------------------------


def test_register_reply_has_the_seed_shape(client):
    response = register(client, "B1", "127.0.0.1", 8000)

    assert response.status_code == 200
    body = response.get_json()
    assert body["success"] is True
    assert body["server_id"] == "B1"
    assert body["ip"] == "127.0.0.1"
    assert body["port"] == 8000
    assert body["url"] == "http://127.0.0.1:8000"
    assert isinstance(body["message"], str)
    assert "B1" in body["message"]
    assert "registered" in body["message"]


def test_register_again_says_updated(client, registered):
    body = register(client, "B1", "127.0.0.1", 8001).get_json()

    assert body["success"] is True
    assert "updated" in body["message"]


def test_registered_server_is_listed_with_the_seed_fields(client):
    register(client, "B1", "127.0.0.1", 8000)

    (server,) = servers(client)
    assert set(server) >= SEED_SERVER_FIELDS  # new abilities add fields beside the seed's
    assert server.pop("health_changed_time")  # set at registration
    assert server == {
        "server_id": "B1",
        "ip": "127.0.0.1",
        "port": 8000,
        "url": "http://127.0.0.1:8000",
        "is_healthy": True,
        "fail_count": 0,
        "last_check_time": None,
        "last_used_time": None,
        "monitor_url": None,
        "last_error": None,
        "weight": 1,
        "priority": 1,
        "max_concurrent": 0,
        "models": [],
        "model_map": {},
        "labels": {},
        "max_allocations": 0,
        "draining": False,
        "discovered_models": [],
        "loaded_models": [],
        "model_memory_gb": {},
        "type": "gpu",
        "description": "",
        "skip_resource_check": False,
        "operator_options": [],
        "token_bound": False,
        "in_flight": 0,
        "ejected": False,
        "ejection_seconds_left": None,
        "effective_weight": 1,
        "served_models": [],
        "resources": None,
    }


def test_register_saves_the_state_file_before_replying(client, app):
    assert stored(app) is None

    register(client, "B1", "127.0.0.1", 8000)

    (entry,) = stored(app)
    assert entry["server_id"] == "B1"
    assert entry["ip"] == "127.0.0.1"
    assert entry["port"] == 8000
    assert SECRET not in state_path(app).read_text(encoding="utf-8")


@pytest.mark.parametrize(
    ("method", "path", "kwargs"),
    [
        ("post", "/webhook/register", {"json": {"server_id": "B2", "ip": "127.0.0.1", "port": 1, "secret": SECRET}}),
        ("post", "/webhook/register", {"json": {"server_id": "B2", "ip": "x y", "port": 1, "secret": SECRET}}),
        ("post", "/webhook/register", {"json": {"server_id": "B2", "secret": SECRET, "extra": SECRET}}),
        ("get", "/webhook/servers", {"headers": AUTH}),
        ("get", "/webhook/servers", {"headers": {"Authorization": f"Bearer {SECRET}"}}),
        ("get", f"/webhook/servers?secret={SECRET}", {}),
        ("post", "/webhook/unregister", {"json": {"server_id": "B1", "secret": SECRET}}),
        ("post", "/webhook/unregister", {"json": {"server_id": "nope", "secret": SECRET}}),
    ],
)
def test_the_secret_is_never_in_a_reply(client, registered, method, path, kwargs):
    response = getattr(client, method)(path, **kwargs)

    assert response.status_code in (200, 400, 404)
    assert SECRET not in response.get_data(as_text=True)
    assert SECRET not in str(response.headers)


# -- where the secret may come from ------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "body_secret"),
    [
        ({}, {"secret": SECRET}),
        ({"X-Webhook-Secret": SECRET}, {}),
        ({"Authorization": f"Bearer {SECRET}"}, {}),
        ({"Authorization": f"bearer {SECRET}"}, {}),
    ],
    ids=["body", "x-webhook-secret", "bearer", "bearer-lowercase-scheme"],
)
def test_register_accepts_the_secret_from(client, app, headers, body_secret):
    body = {"server_id": "B1", "ip": "127.0.0.1", "port": 8000, **body_secret}

    response = client.post("/webhook/register", json=body, headers=headers)

    assert response.status_code == 200, response.get_data(as_text=True)
    assert server_ids(client) == ["B1"]
    assert [entry["server_id"] for entry in stored(app)] == ["B1"]


def test_register_refuses_the_secret_in_the_query(client, app):
    body = {"server_id": "B1", "ip": "127.0.0.1", "port": 8000}

    response = client.post(f"/webhook/register?secret={SECRET}", json=body)

    assert assert_error(response, 401)["message"] == "missing or invalid secret"
    assert servers(client) == []
    assert stored(app) is None


def test_unregister_refuses_the_secret_in_the_query(client, registered):
    response = client.post(f"/webhook/unregister?secret={SECRET}", json={"server_id": "B1"})

    assert_error(response, 401)
    assert server_ids(client) == ["B1"]


@pytest.mark.parametrize(
    "headers",
    [
        {"X-Webhook-Secret": SECRET},
        {"Authorization": f"Bearer {SECRET}"},
    ],
)
def test_list_accepts_the_secret_in_headers(client, registered, headers):
    response = client.get("/webhook/servers", headers=headers)

    assert response.status_code == 200
    assert [server["server_id"] for server in response.get_json()["data"]["servers"]] == ["B1"]


def test_list_accepts_the_secret_in_the_query(client, registered):
    response = client.get("/webhook/servers", query_string={"secret": SECRET})

    assert response.status_code == 200
    assert response.get_json()["data"]["total_servers"] == 1


WRONG_SECRETS = [
    pytest.param({}, {}, id="missing"),
    pytest.param({}, {"secret": ""}, id="empty"),
    pytest.param({}, {"secret": SECRET[:-1] + "X"}, id="same-length"),
    pytest.param({}, {"secret": SECRET[:-1]}, id="prefix"),
    pytest.param({}, {"secret": SECRET + "x"}, id="longer"),
    pytest.param({}, {"secret": "x"}, id="short"),
    pytest.param({}, {"secret": SECRET.upper()}, id="case"),
    pytest.param({}, {"secret": 12345}, id="not-a-string"),
    pytest.param({}, {"secret": [SECRET]}, id="list"),
    pytest.param({"X-Webhook-Secret": "wrong"}, {}, id="header"),
    pytest.param({"Authorization": "Bearer wrong"}, {}, id="bearer"),
    pytest.param({"Authorization": f"Basic {SECRET}"}, {}, id="basic-scheme"),
    pytest.param({"Authorization": SECRET}, {}, id="no-scheme"),
    pytest.param({"X-Webhook-Secret": "wrong"}, {"secret": SECRET}, id="wrong-header-beats-right-body"),
]


@pytest.mark.parametrize(("headers", "body_secret"), WRONG_SECRETS)
def test_register_with_a_wrong_secret_is_401_and_stores_nothing(client, app, headers, body_secret):
    body = {"server_id": "B1", "ip": "127.0.0.1", "port": 8000, **body_secret}

    response = client.post("/webhook/register", json=body, headers=headers)

    assert assert_error(response, 401)["message"] == "missing or invalid secret"
    assert servers(client) == []
    assert stored(app) is None


@pytest.mark.parametrize(("headers", "body_secret"), WRONG_SECRETS)
def test_unregister_with_a_wrong_secret_is_401_and_removes_nothing(client, app, registered, headers, body_secret):
    before_list, before_file = registered

    response = client.post("/webhook/unregister", json={"server_id": "B1", **body_secret}, headers=headers)

    assert_error(response, 401)
    assert servers(client) == before_list
    assert stored(app) == before_file


@pytest.mark.parametrize(
    ("query", "headers"),
    [
        ("", {}),
        ("?secret=", {}),
        ("?secret=wrong", {}),
        (f"?secret={SECRET[:-1]}", {}),
        (f"?secret={SECRET}x", {}),
        ("", {"X-Webhook-Secret": "wrong"}),
        ("", {"Authorization": "Bearer wrong"}),
    ],
)
def test_list_with_a_wrong_secret_is_401(client, registered, query, headers):
    response = client.get("/webhook/servers" + query, headers=headers)

    body = assert_error(response, 401)
    assert "B1" not in response.get_data(as_text=True)
    assert body["errors"] is None


# -- validation ---------------------------------------------------------------------------


def assert_refused(client, app, registered, response, field):
    """400 naming `field`, with the fleet and the state file as they were before."""
    body = assert_error(response, 400)
    assert field in body["errors"], body
    assert isinstance(body["errors"][field], list)
    assert body["errors"][field]
    assert field in body["message"]
    before_list, before_file = registered
    assert servers(client) == before_list
    assert stored(app) == before_file


MISSING = object()


@pytest.mark.parametrize(
    "server_id",
    [
        pytest.param("", id="empty"),
        pytest.param("x" * 65, id="65-chars"),
        pytest.param("B 2", id="space"),
        pytest.param("B/2", id="slash"),
        pytest.param("séver", id="unicode"),
        pytest.param("B2\n", id="trailing-newline"),
        pytest.param("B2?x=1", id="query-chars"),
        pytest.param(5, id="int"),
        pytest.param(None, id="null"),
        pytest.param(["B2"], id="list"),
        pytest.param({"id": "B2"}, id="object"),
        pytest.param(MISSING, id="missing"),
    ],
)
def test_register_refuses_a_bad_server_id(client, app, registered, server_id):
    body = {"ip": "127.0.0.2", "port": 9000, "secret": SECRET}
    if server_id is not MISSING:
        body["server_id"] = server_id

    response = client.post("/webhook/register", json=body)

    assert_refused(client, app, registered, response, "server_id")


@pytest.mark.parametrize("server_id", ["x" * 64, "a", "gpu-node_01.example", "B.2", "0"])
def test_register_accepts_a_good_server_id(client, server_id):
    response = register(client, server_id)

    assert response.status_code == 200, response.get_data(as_text=True)
    assert server_ids(client) == [server_id]


@pytest.mark.parametrize(
    "ip",
    [
        pytest.param("not an address", id="words"),
        pytest.param("999.1.1.1", id="octet-out-of-range"),
        pytest.param("169.254.169.254", id="metadata"),
        pytest.param("169.254.0.1", id="ipv4-link-local"),
        pytest.param("0.0.0.0", id="unspecified-v4"),
        pytest.param("0.1.2.3", id="this-network"),
        pytest.param("224.0.0.1", id="multicast-v4"),
        pytest.param("239.255.255.250", id="multicast-v4-ssdp"),
        pytest.param("fe80::1", id="ipv6-link-local"),
        pytest.param("fe80::1%eth0", id="ipv6-link-local-scoped"),
        pytest.param("ff02::1", id="multicast-v6"),
        pytest.param("::ffff:169.254.169.254", id="v4-mapped-metadata"),
        pytest.param("::ffff:224.0.0.1", id="v4-mapped-multicast"),
        pytest.param("168.63.129.16", id="azure-wireserver"),
        pytest.param("::ffff:168.63.129.16", id="v4-mapped-azure-wireserver"),
        pytest.param("192.0.0.192", id="oracle-cloud-metadata"),
        pytest.param("::", id="unspecified-v6"),
        pytest.param("no-such-host.invalid", id="does-not-resolve"),
        pytest.param("-leading-hyphen.example", id="bad-hostname"),
        pytest.param("http://127.0.0.1", id="url"),
        pytest.param("127.0.0.1:8000", id="with-port"),
        pytest.param("", id="empty"),
        pytest.param(" 127.0.0.1", id="leading-space"),
        pytest.param("a" * 254, id="name-too-long"),
        pytest.param(2130706433, id="int"),
        pytest.param(None, id="null"),
        pytest.param(MISSING, id="missing"),
    ],
)
def test_register_refuses_a_bad_ip(client, app, registered, ip):
    body = {"server_id": "B1", "port": 9000, "secret": SECRET}
    if ip is not MISSING:
        body["ip"] = ip

    response = client.post("/webhook/register", json=body)

    assert_refused(client, app, registered, response, "ip")


@pytest.mark.parametrize(
    "port",
    [
        pytest.param(0, id="zero"),
        pytest.param(65536, id="65536"),
        pytest.param(-1, id="negative"),
        pytest.param("abc", id="letters"),
        pytest.param("", id="empty-string"),
        pytest.param("-1", id="negative-string"),
        pytest.param("80 ", id="trailing-space"),
        pytest.param("0x50", id="hex"),
        pytest.param("65536", id="65536-string"),
        pytest.param(8.5, id="float"),
        pytest.param(8000.0, id="integral-float"),
        pytest.param(True, id="true"),
        pytest.param(False, id="false"),
        pytest.param(None, id="null"),
        pytest.param([8000], id="list"),
        pytest.param(MISSING, id="missing"),
    ],
)
def test_register_refuses_a_bad_port(client, app, registered, port):
    body = {"server_id": "B1", "ip": "127.0.0.1", "secret": SECRET}
    if port is not MISSING:
        body["port"] = port

    response = client.post("/webhook/register", json=body)

    assert_refused(client, app, registered, response, "port")


@pytest.mark.parametrize(("port", "expected"), [("8000", 8000), (1, 1), (65535, 65535), ("65535", 65535)])
def test_register_accepts_a_good_port(client, app, port, expected):
    response = register(client, port=port)

    assert response.status_code == 200, response.get_data(as_text=True)
    assert response.get_json()["port"] == expected
    assert servers(client)[0]["port"] == expected
    assert stored(app)[0]["port"] == expected


def test_register_names_an_unknown_field(client, app, registered):
    response = register(client, "B1", "127.0.0.1", 9000, gpu_count=4)

    assert_refused(client, app, registered, response, "gpu_count")


def test_register_names_every_bad_field(client, app, registered):
    response = client.post("/webhook/register", json={"server_id": "a b", "ip": "::", "port": 0, "secret": SECRET})

    body = assert_error(response, 400)
    assert set(body["errors"]) == {"server_id", "ip", "port"}
    assert body["message"] == "invalid fields: ip, port, server_id"
    assert servers(client) == registered[0]


@pytest.mark.parametrize(
    ("server_id", "field"),
    [("", "server_id"), ("a/b", "server_id"), (7, "server_id"), ("B1", "extra")],
)
def test_unregister_refuses_a_bad_body(client, app, registered, server_id, field):
    body = {"server_id": server_id, "secret": SECRET}
    if field == "extra":
        body["extra"] = 1

    response = client.post("/webhook/unregister", json=body)

    assert_refused(client, app, registered, response, field)


BAD_BODIES = [
    pytest.param({"data": '{"server_id": "B2"}', "content_type": "text/plain"}, id="text-plain"),
    pytest.param({"data": "server_id=B2&ip=127.0.0.1&port=1"}, id="form"),
    pytest.param({"data": '{"server_id": "B2",', "content_type": "application/json"}, id="malformed"),
    pytest.param({"data": b'{"server_id": "\xff"}', "content_type": "application/json"}, id="not-utf8"),
    pytest.param({"data": "", "content_type": "application/json"}, id="empty"),
    pytest.param({"data": "null", "content_type": "application/json"}, id="null"),
    pytest.param({"json": ["B2", "127.0.0.1", 8000]}, id="array"),
    pytest.param({"json": "B2"}, id="string"),
    pytest.param({"json": 42}, id="number"),
]


@pytest.mark.parametrize("path", ["/webhook/register", "/webhook/unregister"])
@pytest.mark.parametrize("kwargs", BAD_BODIES)
def test_a_body_that_is_not_a_json_object_is_400(client, app, registered, path, kwargs):
    response = client.post(path, headers=AUTH, **kwargs)

    body = assert_error(response, 400)
    assert "JSON" in body["message"]
    assert servers(client) == registered[0]
    assert stored(app) == registered[1]


@pytest.mark.parametrize(
    ("path", "headers"),
    [
        ("/webhook/register", {}),  # the body is read before the secret, which it may carry
        ("/webhook/unregister", {}),
        ("/admin/servers", AUTH),
    ],
)
def test_a_body_nested_too_deeply_is_400_naming_the_problem(client, app, registered, path, headers):
    response = client.post(path, data=b"[" * 30_000, content_type="application/json", headers=headers)

    body = assert_error(response, 400)
    assert "nested too deeply" in body["message"]
    assert servers(client) == registered[0]
    assert stored(app) == registered[1]


def padded_body(size: int) -> bytes:
    """A valid registration body of exactly `size` bytes, padded with trailing spaces."""
    body = json.dumps({"server_id": "B2", "ip": "127.0.0.1", "port": 9000, "secret": SECRET}).encode()
    assert len(body) <= size
    return body + b" " * (size - len(body))


def test_a_body_of_exactly_64_kib_is_accepted(client):
    response = client.post("/webhook/register", data=padded_body(MAX_BODY_BYTES), content_type="application/json")

    assert response.status_code == 200, response.get_data(as_text=True)
    assert server_ids(client) == ["B2"]


@pytest.mark.parametrize("path", ["/webhook/register", "/webhook/unregister"])
@pytest.mark.parametrize("size", [MAX_BODY_BYTES + 1, 10 * MAX_BODY_BYTES])
def test_a_body_over_64_kib_is_413(client, app, registered, path, size):
    response = client.post(path, data=padded_body(size), content_type="application/json")

    assert_error(response, 413)
    assert servers(client) == registered[0]
    assert stored(app) == registered[1]


def test_a_chunked_body_over_64_kib_is_413(live_gateway):
    gateway = live_gateway()
    body = padded_body(4 * MAX_BODY_BYTES)
    chunks = (body[i : i + 4096] for i in range(0, len(body), 4096))

    response = requests.post(
        gateway.url + "/webhook/register", data=chunks, headers={"Content-Type": "application/json"}, timeout=10
    )

    assert response.status_code == 413
    assert gateway.manager.list_servers() == []


# -- which addresses may be backends -----------------------------------------------------


def test_allowed_backend_networks_limits_the_addresses(make_app):
    app = make_app(allowed_backend_networks=(ipaddress.ip_network("10.0.0.0/8"),))
    client = app.test_client()

    refused = register(client, "B1", "127.0.0.1", 8000)
    accepted = register(client, "B2", "10.1.2.3", 8000)

    body = assert_error(refused, 400)
    assert "ip" in body["errors"]
    assert "ALLOWED_BACKEND_NETWORKS" in body["errors"]["ip"][0]
    assert accepted.status_code == 200, accepted.get_data(as_text=True)
    assert server_ids(client) == ["B2"]
    assert [entry["server_id"] for entry in stored(app)] == ["B2"]


def test_allowed_backend_networks_applies_to_resolved_names(make_app):
    app = make_app(allowed_backend_networks=(ipaddress.ip_network("10.0.0.0/8"),))
    client = app.test_client()

    response = register(client, "B1", "localhost", 8000)

    assert "ip" in assert_error(response, 400)["errors"]
    assert servers(client) == []


def test_allowed_backend_networks_still_refuses_blocked_addresses(make_app):
    app = make_app(allowed_backend_networks=(ipaddress.ip_network("169.254.0.0/16"),))
    client = app.test_client()

    response = register(client, "B1", "169.254.169.254", 80)

    assert "ip" in assert_error(response, 400)["errors"]
    assert servers(client) == []


def test_ipv6_loopback_gets_a_bracketed_url(client, app):
    response = register(client, "B6", "::1", 8000)

    assert response.status_code == 200, response.get_data(as_text=True)
    assert response.get_json()["url"] == "http://[::1]:8000"
    (server,) = servers(client)
    assert server["ip"] == "::1"
    assert server["url"] == "http://[::1]:8000"
    assert stored(app)[0]["url"] == "http://[::1]:8000"


def test_a_dns_name_is_accepted_as_given(client):
    response = register(client, "B1", "localhost", 8000)

    assert response.status_code == 200, response.get_data(as_text=True)
    (server,) = servers(client)
    assert server["ip"] == "localhost"
    assert server["url"] == "http://localhost:8000"


# -- the gateway's own address -------------------------------------------------------------


def post_register(gateway, ip, port, headers=None):
    body = {"server_id": "GW", "ip": ip, "port": port, "secret": SECRET}
    return requests.post(gateway.url + "/webhook/register", json=body, headers=headers, timeout=5)


def refused_over_http(response) -> dict:
    """The field errors of a 400 in the one error shape, from a real HTTP reply."""
    assert response.status_code == 400, response.text
    body = response.json()
    assert set(body) == {"success", "message", "errors"}
    assert body["success"] is False
    return body["errors"]


@pytest.mark.parametrize("ip", ["127.0.0.1", "localhost", "127.0.0.2", "::1", "::ffff:127.0.0.1", "0.0.0.0"])
def test_the_gateway_cannot_be_registered_as_its_own_backend(live_gateway, ip):
    # Registered at its own address, one request looped through the gateway 744 times.
    gateway = live_gateway()
    port = gateway.server.server_port

    response = post_register(gateway, ip, port)

    assert "ip" in refused_over_http(response)
    assert gateway.manager.list_servers() == []
    assert not state_path(gateway.app).exists()


def test_the_own_address_message_names_the_loop(live_gateway):
    gateway = live_gateway()
    port = gateway.server.server_port

    (message,) = refused_over_http(post_register(gateway, "127.0.0.1", port))["ip"]

    assert f"127.0.0.1 port {port} is this gateway's own address" in message
    assert "loop" in message


def test_a_forwarded_host_does_not_hide_the_gateways_port(live_gateway):
    gateway = live_gateway(trusted_proxy_count=1)  # X-Forwarded-Host is believed, and rewrites SERVER_PORT
    port = gateway.server.server_port

    response = post_register(gateway, "127.0.0.1", port, headers={"X-Forwarded-Host": "gateway.example:8443"})

    assert "ip" in refused_over_http(response)
    assert gateway.manager.list_servers() == []


def test_another_port_on_the_gateways_host_may_register(live_gateway):
    gateway = live_gateway()

    response = post_register(gateway, "127.0.0.1", gateway.server.server_port % 65535 + 1)

    assert response.status_code == 200, response.text
    assert [server.server_id for server in gateway.manager.list_servers()] == ["GW"]


class LocalEnd:
    """The connection socket a WSGI server hands on: only its local address is asked for."""

    def __init__(self, address):
        self.address = address

    def getsockname(self):
        return self.address


@pytest.mark.parametrize("key", ["gunicorn.socket", "werkzeug.socket"])
def test_the_local_address_the_request_came_in_on_is_the_gateway(client, app, key):
    # Documentation addresses (192.0.2.0/24): nothing ever connects to them (the health job waits an hour).
    environ = {key: LocalEnd(("192.0.2.10", 5000))}

    refused = client.post(
        "/webhook/register",
        json={"server_id": "GW", "ip": "192.0.2.10", "port": 5000, "secret": SECRET},
        environ_overrides=environ,
    )
    accepted = client.post(
        "/webhook/register",
        json={"server_id": "B2", "ip": "192.0.2.11", "port": 5000, "secret": SECRET},
        environ_overrides=environ,
    )

    assert "ip" in assert_error(refused, 400)["errors"]
    assert accepted.status_code == 200, accepted.get_data(as_text=True)
    assert server_ids(client) == ["B2"]


def test_an_ipv4_mapped_local_address_is_the_gateway_too(client):
    environ = {"gunicorn.socket": LocalEnd(("::ffff:192.0.2.10", 5000, 0, 0))}

    response = client.post(
        "/webhook/register",
        json={"server_id": "GW", "ip": "192.0.2.10", "port": 5000, "secret": SECRET},
        environ_overrides=environ,
    )

    assert "ip" in assert_error(response, 400)["errors"]


def test_without_a_socket_the_server_port_is_the_gateways(client):
    response = client.post(
        "/webhook/register",
        json={"server_id": "GW", "ip": "127.0.0.1", "port": 8080, "secret": SECRET},
        environ_overrides={"SERVER_PORT": "8080"},
    )

    assert "ip" in assert_error(response, 400)["errors"]
    assert servers(client) == []


def test_without_a_socket_a_forwarded_host_does_not_hide_the_port(make_app):
    client = make_app(trusted_proxy_count=1).test_client()

    response = client.post(
        "/webhook/register",
        json={"server_id": "GW", "ip": "127.0.0.1", "port": 8080, "secret": SECRET},
        headers={"X-Forwarded-Host": "gateway.example:8443"},  # ProxyFix makes SERVER_PORT 8443
        environ_overrides={"SERVER_PORT": "8080"},
    )

    assert "ip" in assert_error(response, 400)["errors"]


@pytest.mark.slow
def test_gunicorn_refuses_its_own_address(gateway_process):
    gateway = gateway_process()
    body = {"server_id": "GW", "ip": "127.0.0.1", "port": gateway.port, "secret": SECRET}

    response = requests.post(gateway.url + "/webhook/register", json=body, timeout=5)

    assert "ip" in refused_over_http(response)


# -- how many servers --------------------------------------------------------------------


def test_a_new_server_past_max_servers_is_507_naming_the_limit(make_app):
    app = make_app(max_servers=2)
    client = app.test_client()
    assert register(client, "B1", port=9001).status_code == 200
    assert register(client, "B2", port=9002).status_code == 200

    response = register(client, "B3", port=9003)

    assert "MAX_SERVERS=2" in assert_error(response, 507)["message"]
    assert server_ids(client) == ["B1", "B2"]
    assert [entry["server_id"] for entry in stored(app)] == ["B1", "B2"]


def test_a_full_fleet_still_takes_heartbeats_moves_and_frees_a_place(make_app):
    client = make_app(max_servers=1).test_client()
    register(client, "B1", port=9001)

    assert register(client, "B1", port=9001).status_code == 200  # a heartbeat
    assert register(client, "B1", port=9009).status_code == 200  # a move
    assert unregister(client, "B1").status_code == 200
    assert register(client, "B2", port=9002).status_code == 200
    assert server_ids(client) == ["B2"]


# -- registering again --------------------------------------------------------------------


def mark_unhealthy(manager, server_id):
    server = manager.get_server(server_id)
    for _ in range(3):
        manager.apply_health_results([HealthResult(server_id, server.url, False, "x")])


def test_registering_again_moves_the_server_keeps_its_place_and_resets_health(client, app, manager):
    for server_id, port in (("B1", 9001), ("B2", 9002), ("B3", 9003)):
        assert register(client, server_id, "127.0.0.1", port).status_code == 200
    mark_unhealthy(manager, "B2")
    data = fleet(client)
    assert data["servers"][1]["is_healthy"] is False
    assert data["servers"][1]["fail_count"] == 3
    assert data["unhealthy_servers"] == 1

    response = register(client, "B2", "127.0.0.2", 9999)

    assert response.status_code == 200
    assert "updated" in response.get_json()["message"]
    data = fleet(client)
    assert [server["server_id"] for server in data["servers"]] == ["B1", "B2", "B3"]
    b2 = data["servers"][1]
    assert (b2["ip"], b2["port"], b2["url"]) == ("127.0.0.2", 9999, "http://127.0.0.2:9999")
    assert b2["is_healthy"] is True
    assert b2["fail_count"] == 0
    assert (data["healthy_servers"], data["unhealthy_servers"]) == (3, 0)
    assert [(e["server_id"], e["port"], e["is_healthy"]) for e in stored(app)] == [
        ("B1", 9001, True),
        ("B2", 9999, True),
        ("B3", 9003, True),
    ]


def test_a_heartbeat_at_the_same_address_keeps_health_and_writes_nothing(client, app, manager):
    register(client, "B1", "127.0.0.1", 9001)
    mark_unhealthy(manager, "B1")
    state_file = Path(app.config["GATEWAY"].backend_servers_file)
    before = state_file.stat().st_mtime_ns, state_file.read_bytes()

    response = register(client, "B1", "127.0.0.1", 9001)  # an agent's heartbeat

    assert response.status_code == 200
    (server,) = servers(client)
    assert server["is_healthy"] is False  # a live agent must not hide a dead service
    assert server["fail_count"] == 3
    assert (state_file.stat().st_mtime_ns, state_file.read_bytes()) == before


# -- unregister ---------------------------------------------------------------------------


def test_unregister_removes_the_server(client, app):
    register(client, "B1", "127.0.0.1", 9001)
    register(client, "B2", "127.0.0.1", 9002)

    response = unregister(client, "B1")

    assert response.status_code == 200
    body = response.get_json()
    assert body["success"] is True
    assert body["server_id"] == "B1"
    assert "B1" in body["message"]
    assert server_ids(client) == ["B2"]
    assert [entry["server_id"] for entry in stored(app)] == ["B2"]


@pytest.mark.parametrize(
    "headers",
    [{"X-Webhook-Secret": SECRET}, {"Authorization": f"Bearer {SECRET}"}],
)
def test_unregister_accepts_the_secret_in_headers(client, registered, headers):
    response = client.post("/webhook/unregister", json={"server_id": "B1"}, headers=headers)

    assert response.status_code == 200
    assert servers(client) == []


def test_unregister_an_unknown_server_is_404(client, app, registered):
    response = unregister(client, "B9")

    body = assert_error(response, 404)
    assert "B9" in body["message"]
    assert servers(client) == registered[0]
    assert stored(app) == registered[1]


def test_unregister_twice_is_404_the_second_time(client, registered):
    assert unregister(client, "B1").status_code == 200

    assert_error(unregister(client, "B1"), 404)


def test_unregister_without_a_secret_is_401(client, app, registered):
    response = client.post("/webhook/unregister", json={"server_id": "B1"})

    assert_error(response, 401)
    assert servers(client) == registered[0]
    assert stored(app) == registered[1]


# -- the list's counts and the health job -------------------------------------------------


def test_list_with_no_servers(client):
    data = fleet(client)

    assert data == {
        "total_servers": 0,
        "healthy_servers": 0,
        "unhealthy_servers": 0,
        "health_check_running": False,
        "servers": [],
    }


def test_list_counts_and_the_health_job_follow_the_fleet(client, manager):
    register(client, "B1", "127.0.0.1", 9001)
    data = fleet(client)
    assert (data["total_servers"], data["healthy_servers"], data["unhealthy_servers"]) == (1, 1, 0)
    assert data["health_check_running"] is True

    register(client, "B2", "127.0.0.1", 9002)
    mark_unhealthy(manager, "B1")
    data = fleet(client)
    assert (data["total_servers"], data["healthy_servers"], data["unhealthy_servers"]) == (2, 1, 1)
    assert data["health_check_running"] is True

    unregister(client, "B1")
    data = fleet(client)
    assert (data["total_servers"], data["healthy_servers"], data["unhealthy_servers"]) == (1, 1, 0)
    assert data["health_check_running"] is True

    unregister(client, "B2")
    data = fleet(client)
    assert (data["total_servers"], data["healthy_servers"], data["unhealthy_servers"]) == (0, 0, 0)
    assert data["health_check_running"] is False

    register(client, "B3", "127.0.0.1", 9003)
    assert fleet(client)["health_check_running"] is True


def test_list_reply_has_the_seed_shape(client, registered):
    response = client.get("/webhook/servers", headers=AUTH)

    body = response.get_json()
    assert set(body) == {"success", "data"}
    assert list(body["data"]) == [
        "total_servers",
        "healthy_servers",
        "unhealthy_servers",
        "health_check_running",
        "servers",
    ]


# -- errors outside the views -------------------------------------------------------------


@pytest.mark.parametrize("path", ["/nope", "/webhook", "/webhook/nope", "/webhook/servers/B1"])
def test_an_unknown_route_is_a_json_404(client, path):
    assert_error(client.get(path, headers=AUTH), 404)


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        ("get", "/webhook/register", "POST"),
        ("put", "/webhook/register", "POST"),
        ("get", "/webhook/unregister", "POST"),
        ("delete", "/webhook/unregister", "POST"),
        ("post", "/webhook/servers", "GET"),
    ],
)
def test_a_wrong_method_is_a_json_405_with_allow(client, method, path, allowed):
    response = getattr(client, method)(path, headers=AUTH)

    assert_error(response, 405)
    assert allowed in response.headers["Allow"]


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/webhook/register", {"server_id": "B2", "ip": "127.0.0.1", "port": 9002}),
        ("/webhook/unregister", {"server_id": "B1"}),
    ],
)
def test_a_change_that_cannot_be_saved_is_503_with_retry_after(client, manager, registered, monkeypatch, path, body):
    def fail(entries):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(manager.store, "save", fail)

    response = client.post(path, json=body, headers=AUTH)

    body = assert_error(response, 503)
    assert "No space left on device" in body["message"]
    assert response.headers["Retry-After"] == "5"


def test_retrying_an_unregister_that_was_not_saved_saves_it(client, app, manager, registered, monkeypatch):
    save = manager.store.save

    def fail(entries):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(manager.store, "save", fail)
    assert unregister(client, "B1").status_code == 503
    monkeypatch.setattr(manager.store, "save", save)

    retry = unregister(client, "B1")

    assert retry.status_code == 200
    assert stored(app) == []


def test_a_port_of_non_decimal_digits_is_400(client, app, registered):
    response = register(client, "B1", "127.0.0.1", "²")

    assert_refused(client, app, registered, response, "port")


def test_the_ipv6_metadata_address_is_refused(client, app, registered):
    response = register(client, "B1", "fd00:ec2::254", 80)

    assert_refused(client, app, registered, response, "ip")


def test_a_lone_surrogate_as_secret_is_refused_not_a_crash(client):
    response = client.post(
        "/webhook/register",
        data=b'{"server_id": "B1", "ip": "127.0.0.1", "port": 8000, "secret": "\\ud800"}',
        content_type="application/json",
    )
    assert response.status_code == 401


def test_an_encoded_secret_parameter_is_not_accepted(client):
    # `?%73ecret=` would authenticate while escaping the log redaction, which matches `secret=`.
    response = client.get("/webhook/servers?%73ecret=" + SECRET)
    assert response.status_code == 401


def test_alibaba_metadata_address_is_refused(client):
    response = client.post(
        "/webhook/register", json={"server_id": "B1", "ip": "100.100.100.200", "port": 80, "secret": SECRET}
    )
    assert response.status_code == 400
    assert "ip" in response.get_json()["errors"]


@pytest.mark.parametrize(
    ("extra", "monitor_url"),
    [
        ({"monitor_port": 8006}, "http://127.0.0.1:8006"),
        ({"monitor_port": "8005"}, "http://127.0.0.1:8005"),
        ({"monitor_url": "http://localhost:8006/"}, "http://localhost:8006"),
        ({"monitor_url": "https://localhost"}, "https://localhost"),
        ({"monitor_url": "http://[::1]:8006"}, "http://[::1]:8006"),
        ({"monitor_url": "HTTP://LocalHost:08006"}, "http://localhost:8006"),
        ({}, None),
    ],
)
def test_register_with_a_resource_monitor(client, manager, extra, monitor_url):
    body = {"server_id": "B1", "ip": "127.0.0.1", "port": 8000, "secret": SECRET, **extra}
    response = client.post("/webhook/register", json=body)
    assert response.status_code == 200
    assert response.get_json().get("monitor_url") == monitor_url
    assert manager.get_server("B1").monitor_url == monitor_url


@pytest.mark.parametrize(
    ("extra", "field"),
    [
        ({"monitor_port": 0}, "monitor_port"),
        ({"monitor_port": "x"}, "monitor_port"),
        ({"monitor_url": "ftp://h:1"}, "monitor_url"),
        ({"monitor_url": "http://169.254.169.254/latest"}, "monitor_url"),
        ({"monitor_url": "http://u:p@h:1"}, "monitor_url"),
        ({"monitor_url": "http://@127.0.0.1:8006"}, "monitor_url"),
        ({"monitor_url": "http://127.0.0.1:99999"}, "monitor_url"),
        ({"monitor_url": "http://127.0.0.1:65536"}, "monitor_url"),
        ({"monitor_url": "http://127.0.0.1:0"}, "monitor_url"),
        ({"monitor_url": "http://127.0.0.1:x"}, "monitor_url"),
        ({"monitor_url": "http://127.0.0.1:+80"}, "monitor_url"),
        ({"monitor_url": "http://127.0.0.1:"}, "monitor_url"),
        ({"monitor_url": "http://["}, "monitor_url"),
        ({"monitor_url": "http://[::1"}, "monitor_url"),
        ({"monitor_url": "http://127.0.0.1:8006/api/generate"}, "monitor_url"),
        ({"monitor_url": "http://127.0.0.1:8006/resources"}, "monitor_url"),
        ({"monitor_url": "http://127.0.0.1:8006/?x=1"}, "monitor_url"),
        ({"monitor_url": "http://127.0.0.1:8006#top"}, "monitor_url"),
        ({"monitor_url": "http://127.0.0.1:80\n06"}, "monitor_url"),
        ({"monitor_url": " http://127.0.0.1:8006"}, "monitor_url"),
        ({"monitor_url": "http://168.63.129.16:8006"}, "monitor_url"),
        ({"monitor_url": "http://192.0.0.192"}, "monitor_url"),
        ({"monitor_url": "http:///127.0.0.1:8006"}, "monitor_url"),
        ({"monitor_url": 8006}, "monitor_url"),
        ({"monitor_port": 8006, "monitor_url": "http://127.0.0.1:8006"}, "monitor_port"),
    ],
)
def test_bad_monitor_fields_are_refused(client, manager, extra, field):
    body = {"server_id": "B1", "ip": "127.0.0.1", "port": 8000, "secret": SECRET, **extra}
    response = client.post("/webhook/register", json=body)
    assert response.status_code == 400
    assert field in response.get_json()["errors"]
    assert manager.get_server("B1") is None


@pytest.mark.parametrize(
    ("monitor_url", "says"),
    [
        ("http://127.0.0.1:8006/api/generate", "may not have a path"),
        ("http://127.0.0.1:99999", "a port from 1 to 65535"),
        ("http://127.0.0.1:0", "a port from 1 to 65535"),
        ("http://168.63.129.16:8006", "metadata"),
    ],
)
def test_a_refused_monitor_url_says_why(client, monitor_url, says):
    response = register(client, monitor_url=monitor_url)

    (message,) = assert_error(response, 400)["errors"]["monitor_url"]
    assert says in message


def test_re_registering_without_a_monitor_forgets_it(client, manager):
    body = {"server_id": "B1", "ip": "127.0.0.1", "port": 8000, "secret": SECRET}
    client.post("/webhook/register", json={**body, "monitor_port": 8006})
    client.post("/webhook/register", json=body)
    assert manager.get_server("B1").monitor_url is None


# -- routing options at registration -----------------------------------------------------

OPTIONS = {
    "weight": 30,
    "priority": 2,
    "max_concurrent": 8,
    "models": ["qwen3:14b"],
    "model_map": {"qwen3": "qwen3:14b"},
    "labels": {"gpu": "a100"},
    "model_memory_gb": {"qwen3:14b": 24, "llama3": 7.5},
    "type": "cpu",
    "description": "the spare box under the desk",
    "skip_resource_check": True,
    "max_allocations": 12,
}
DEFAULT_OPTIONS = {
    "weight": 1,
    "priority": 1,
    "max_concurrent": 0,
    "models": [],
    "model_map": {},
    "labels": {},
    "model_memory_gb": {},
    "type": "gpu",
    "description": "",
    "skip_resource_check": False,
    "max_allocations": 0,
}


def test_register_reply_carries_the_options(client):
    body = register(client).get_json()

    assert {name: body[name] for name in DEFAULT_OPTIONS} == DEFAULT_OPTIONS


def test_register_passes_the_options_through_and_saves_them(client, app, manager):
    response = register(client, **OPTIONS)

    assert response.status_code == 200, response.get_data(as_text=True)
    assert {name: response.get_json()[name] for name in OPTIONS} == OPTIONS
    assert manager.get_server("B1").options() == OPTIONS
    (entry,) = stored(app)
    assert {name: entry[name] for name in OPTIONS} == OPTIONS


def test_registering_again_without_options_keeps_them(client, manager):
    register(client, **OPTIONS)

    response = register(client, port=8001)  # a move, as an agent's re-registration would make

    assert {name: response.get_json()[name] for name in OPTIONS} == OPTIONS
    assert manager.get_server("B1").options() == OPTIONS


def test_registering_again_with_one_option_changes_only_it(client, manager):
    register(client, **OPTIONS)

    register(client, weight=5)

    assert manager.get_server("B1").options() == {**OPTIONS, "weight": 5}


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("weight", 0),
        ("weight", 1001),
        ("priority", 0),
        ("priority", 101),
        ("max_concurrent", -1),
        ("models", "qwen3"),
        ("model_map", {"qwen3": ""}),
        ("labels", {"gpu": 1}),
        ("model_memory_gb", {"qwen3:14b": 0}),
        ("model_memory_gb", {"qwen3:14b": "24"}),
        ("model_memory_gb", {"qwen3:14b": False}),
        ("model_memory_gb", {"bad name": 24}),
        ("model_memory_gb", ["qwen3:14b", 24]),
        ("type", "tpu"),
        ("type", 1),
        ("description", "d" * 1001),
        ("description", ["d"]),
        ("skip_resource_check", 1),
        ("skip_resource_check", "false"),
    ],
)
def test_register_refuses_a_bad_option(client, app, registered, option, value):
    response = register(client, port=9000, **{option: value})

    body = assert_error(response, 400)
    assert option in body["errors"]
    assert option in body["message"]
    assert servers(client) == registered[0]
    assert stored(app) == registered[1]


@pytest.mark.parametrize(
    ("option", "raw"),
    [
        ("models", b'["\\ud800"]'),
        ("model_map", b'{"qwen3": "\\udfff"}'),
        ("labels", b'{"\\ud800": "a100"}'),
        ("labels", b'{"gpu": "a100 \\ud800"}'),
    ],
)
def test_a_lone_surrogate_in_an_option_is_400_and_later_saves_still_work(client, app, registered, option, raw):
    # JSON may carry "\ud800"; UTF-8 cannot write it: it was a 500 that left every later save failing.
    body = b'{"server_id": "B2", "ip": "127.0.0.1", "port": 9002, "%s": %s}' % (option.encode(), raw)

    response = client.post("/webhook/register", data=body, content_type="application/json", headers=AUTH)

    assert option in assert_error(response, 400)["errors"]
    assert (servers(client), stored(app)) == registered
    assert register(client, "B3", port=9003).status_code == 200
    assert [entry["server_id"] for entry in stored(app)] == ["B1", "B3"]


# -- binding an id to its first registrant (REGISTRATION_BINDING=token) --------------------------


@pytest.fixture
def bound(make_app, caplog):
    """A gateway with REGISTRATION_BINDING=token and B1 registered; the app, its client and B1's token."""
    app = make_app(registration_binding="token")
    client = app.test_client()
    response = register(client, "B1", port=9001)
    assert response.status_code == 200, response.get_data(as_text=True)
    return app, client, response.get_json()["server_token"]


def test_without_binding_a_registration_gets_no_token_and_anyone_may_move_it(client, registered):
    response = register(client, "B1", "127.0.0.2", 9666)

    assert response.status_code == 200
    assert "server_token" not in response.get_json()
    assert servers(client)[0]["port"] == 9666


def test_the_first_registration_gets_a_token_shown_once_and_kept_as_a_hash(bound, caplog):
    app, client, token = bound

    assert isinstance(token, str)
    assert len(token) >= 43
    again = register(client, "B1", port=9001, server_token=token)
    assert "server_token" not in again.get_json()
    text = state_path(app).read_text(encoding="utf-8")
    assert token not in text
    assert stored(app)[0]["token_hash"].startswith("sha256:")
    listing = client.get("/webhook/servers", headers=AUTH).get_data(as_text=True)
    assert token not in listing
    assert "sha256:" not in listing
    assert servers(client)[0]["token_bound"] is True
    assert token not in caplog.text
    assert stored(app)[0]["token_hash"] not in caplog.text


@pytest.mark.parametrize(
    ("extra", "headers", "says"),
    [
        pytest.param({}, {}, "is bound to a server token", id="no-token"),
        pytest.param({"server_token": "guess"}, {}, "is wrong", id="wrong-token-in-the-body"),
        pytest.param({}, {"X-Server-Token": "guess"}, "is wrong", id="wrong-token-in-the-header"),
        pytest.param({"server_token": ""}, {}, "is wrong", id="empty-token"),
    ],
)
def test_a_bound_id_cannot_be_taken_over_without_its_token(bound, extra, headers, says):
    app, client, token = bound
    before = servers(client), stored(app)
    # Anyone holding the webhook secret moves B1 to an address of their own, with options of their own.
    body = {"server_id": "B1", "ip": "127.0.0.2", "port": 9666, "weight": 1000, "secret": SECRET, **extra}

    response = client.post("/webhook/register", json=body, headers=headers)

    message = assert_error(response, 403)["message"]
    assert says in message
    assert "reset-token" in message
    assert token not in response.get_data(as_text=True)
    assert (servers(client), stored(app)) == before


@pytest.mark.parametrize("where", ["header", "body"])
def test_the_token_lets_its_server_move_and_heartbeat(bound, where):
    app, client, token = bound
    extra, headers = ({}, {"X-Server-Token": token}) if where == "header" else ({"server_token": token}, {})
    body = {"server_id": "B1", "ip": "127.0.0.2", "port": 9002, "secret": SECRET, **extra}

    response = client.post("/webhook/register", json=body, headers=headers)

    assert response.status_code == 200, response.get_data(as_text=True)
    assert "server_token" not in response.get_json()
    assert (stored(app)[0]["ip"], stored(app)[0]["port"]) == ("127.0.0.2", 9002)


def test_a_bound_id_needs_its_token_to_unregister(bound):
    app, client, token = bound

    refused = unregister(client, "B1")
    wrong = unregister(client, "B1", server_token=token[:-1])
    accepted = unregister(client, "B1", server_token=token)

    assert "bound to a server token" in assert_error(refused, 403)["message"]
    assert "wrong" in assert_error(wrong, 403)["message"]
    assert accepted.status_code == 200
    assert stored(app) == []


def test_after_unregistering_the_id_binds_a_new_token(bound):
    _, client, token = bound
    unregister(client, "B1", server_token=token)

    response = register(client, "B1", port=9001)

    new = response.get_json()["server_token"]
    assert new != token
    assert "wrong" in assert_error(register(client, "B1", port=9003, server_token=token), 403)["message"]


def test_a_server_registered_before_binding_is_bound_by_its_next_registration(make_config, make_app):
    client = make_app(make_config()).test_client()
    register(client, "B1", port=9001)

    bound_client = make_app(make_config(registration_binding="token")).test_client()
    response = register(bound_client, "B1", port=9001)

    token = response.get_json()["server_token"]
    assert register(bound_client, "B1", port=9001, server_token=token).status_code == 200
    assert_error(register(bound_client, "B1", port=9001), 403)


def test_the_binding_survives_a_restart(make_config, make_app):
    config = make_config(registration_binding="token")
    token = register(make_app(config).test_client(), "B1", port=9001).get_json()["server_token"]

    client = make_app(config).test_client()

    assert_error(register(client, "B1", port=9666), 403)
    assert register(client, "B1", port=9001, server_token=token).status_code == 200


def test_with_binding_off_again_a_bound_server_registers_the_seeds_way(make_config, make_app):
    token = register(make_app(make_config(registration_binding="token")).test_client(), "B1").get_json()["server_token"]
    app = make_app(make_config())
    client = app.test_client()

    response = register(client, "B1", port=9666)

    assert response.status_code == 200
    assert "server_token" not in response.get_json()
    assert stored(app)[0]["token_hash"].startswith("sha256:")  # kept, should binding come back
    assert token not in state_path(app).read_text(encoding="utf-8")


@pytest.mark.parametrize("value", [5, None, ["x"]])
def test_a_server_token_that_is_not_a_string_is_400(bound, value):
    _, client, _ = bound

    response = register(client, "B2", port=9002, server_token=value)

    assert "server_token" in assert_error(response, 400)["errors"]
