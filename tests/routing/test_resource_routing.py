"""Routing by monitor readings: required GPU memory, least_load, staleness, and rankings."""

import time

import pytest

from gateway.fleet.resources import GIB, parse_reading
from gateway.manager import BackendManager
from tests.fleet.test_resources import report


def fleet(policy: str = "round_robin", **servers) -> BackendManager:
    """Servers B1.. in order; each value is a report() or None for a server without a monitor."""
    manager = BackendManager(health_check_interval=30)
    manager.routing_policy = policy
    readings = []
    for server_id, document in servers.items():
        monitor = None if document is None else f"http://127.0.0.1:9{len(readings):03d}"
        manager.register_server(server_id, "127.0.0.1", 8000, monitor_url=monitor)
        if document is not None:
            readings.append((server_id, monitor, parse_reading(document, time.monotonic())))
    manager.apply_readings(readings)
    return manager


def picks(manager: BackendManager, count: int, required_gb: float | None = None) -> list[str | None]:
    required = None if required_gb is None else int(required_gb * GIB)
    return [getattr(manager.pick_server(required_bytes=required).server, "server_id", None) for _ in range(count)]


def test_only_servers_with_room_take_a_request_that_needs_it():
    manager = fleet(B1=report(gpus=((24, 20),)), B2=report(gpus=((80, 10),)), B3=report(gpus=((48, 10),)))
    assert picks(manager, 4, required_gb=30) == ["B2", "B3", "B2", "B3"]
    assert picks(manager, 2, required_gb=50) == ["B2", "B2"]


def test_nothing_fits_says_so():
    manager = fleet(B1=report(gpus=((24, 20),)))
    pick = manager.pick_server(required_bytes=10 * GIB)
    assert pick.server is None
    assert pick.no_fit


def test_servers_without_a_monitor_are_the_last_resort():
    manager = fleet(B1=None, B2=report(gpus=((24, 20),)), B3=report(gpus=((80, 10),)))
    assert picks(manager, 2, required_gb=30) == ["B3", "B3"]
    assert picks(manager, 2, required_gb=70) == ["B1", "B1"]


def test_a_stale_reading_is_never_used():
    manager = fleet(B1=report(gpus=((80, 10),)), B2=report(gpus=((80, 10),)))
    stale = parse_reading(report(gpus=((80, 10),)), time.monotonic() - 91)
    manager.apply_readings([("B1", manager.get_server("B1").monitor_url, stale)])
    # B1's capacity is now unknown: B2 fits, so B1 is not used.
    assert picks(manager, 3, required_gb=30) == ["B2", "B2", "B2"]
    assert manager.get_status()["servers"][0]["resources"]["stale"] is True


def test_plain_requests_ignore_readings_under_round_robin():
    manager = fleet(B1=report(gpus=((24, 24),)), B2=report(gpus=((80, 0),)))
    assert picks(manager, 4) == ["B1", "B2", "B1", "B2"]


def test_least_load_prefers_the_lowest_score_and_rotates_ties():
    busy = report(cpu=90.0)
    manager = fleet("least_load", B1=busy, B2=report(cpu=10.0), B3=report(cpu=10.0), B4=None)
    assert picks(manager, 4) == ["B2", "B3", "B2", "B3"]


def test_unhealthy_servers_are_not_candidates_whatever_their_reading():
    manager = fleet(B1=report(gpus=((80, 0),)), B2=report(gpus=((80, 50),)))
    manager.report_failure("B1", manager.get_server("B1").url, "refused")
    for _ in range(2):
        manager.report_failure("B1", manager.get_server("B1").url, "refused")
    assert picks(manager, 2, required_gb=10) == ["B2", "B2"]


def test_a_reading_for_an_old_monitor_address_is_dropped():
    manager = fleet(B1=report())
    manager.register_server("B1", "127.0.0.1", 8000, monitor_url="http://127.0.0.1:7000")
    assert manager.get_status()["servers"][0]["resources"] is None
    manager.apply_readings([("B1", "http://127.0.0.1:9000", parse_reading(report(), time.monotonic()))])
    assert manager.get_status()["servers"][0]["resources"] is None


def test_rankings_order_by_score_with_unknowns_last():
    manager = fleet(B1=report(cpu=80.0), B2=None, B3=report(cpu=5.0))
    ranked = manager.rankings()
    assert [row["server_id"] for row in ranked] == ["B3", "B1", "B2"]
    assert ranked[0]["score"] < ranked[1]["score"]
    assert ranked[2]["score"] is None


@pytest.mark.parametrize("value", ["0", "-1", "abc", "nan", "inf", "1e9"])
def test_a_bad_memory_header_is_refused(client, value):
    response = client.get("/api/x", headers={"X-Required-GPU-Memory-GB": value})
    assert response.status_code == 400
    assert "X-Required-GPU-Memory-GB" in response.get_json()["message"]


def test_rankings_need_the_secret(client):
    from conftest import SECRET

    assert client.get("/admin/rankings").status_code == 401
    assert client.get("/admin/rankings?secret=" + SECRET).status_code == 401
    response = client.get("/admin/rankings", headers={"Authorization": f"Bearer {SECRET}"})
    assert response.status_code == 200
    assert response.get_json()["data"]["servers"] == []
