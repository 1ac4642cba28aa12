"""Routing by a model's memory need and by where it is loaded: the need filters, a loaded model is preferred."""

from __future__ import annotations

import time

import pytest
from fake_monitor import GIB, gpu_report

from gateway.fleet.resources import parse_reading
from gateway.manager import BackendManager, NoServer, RouteRequest

MODEL = "qwen3:14b"


def fleet(*servers: tuple[str, tuple[float, float] | None, dict], policy: str = "round_robin") -> BackendManager:
    """Servers in order, each (id, (total GiB, used GiB) of its one GPU or None for no monitor, options)."""
    manager = BackendManager(health_check_interval=30)
    manager.routing_policy = policy
    readings = []
    for index, (server_id, gpu, options) in enumerate(servers):
        monitor = None if gpu is None else f"http://127.0.0.1:{9100 + index}"
        manager.register_server(server_id, "127.0.0.1", 8000 + index, monitor, {"models": [MODEL], **options})
        if gpu is not None:
            readings.append((server_id, monitor, parse_reading(gpu_report(*gpu), time.monotonic())))
    manager.apply_readings(readings)
    return manager


def loaded(manager: BackendManager, server_id: str, *models: str) -> None:
    """What the sweep would keep after the server's /api/ps named `models`."""
    manager.apply_loaded([(server_id, manager.get_server(server_id).url, [(m, 10 * GIB) for m in models])])


def picks(manager: BackendManager, count: int, model: str | None = MODEL, required_gb: float | None = None) -> list:
    required = None if required_gb is None else int(required_gb * GIB)
    chosen = []
    for _ in range(count):
        lease = manager.acquire(RouteRequest(model=model, required_bytes=required), timeout=0)
        chosen.append(lease.server.server_id)
        lease.release()
    return chosen


SMALL, BIG = (24, 20), (80, 10)  # 24*0.9-20 = 1.6 GiB usable; 80*0.9-10 = 62 GiB


def test_the_fleets_need_for_a_model_sends_it_only_where_it_fits():
    manager = fleet(("B1", SMALL, {}), ("B2", BIG, {}), ("B3", BIG, {}))
    assert sorted(set(picks(manager, 6))) == ["B1", "B2", "B3"]  # no need declared: every server

    manager.selector.placement.set_fleet_needs({MODEL: 24})

    assert picks(manager, 4) == ["B2", "B3", "B2", "B3"]


def test_a_need_that_fits_nowhere_is_a_503_naming_the_model_and_the_gb():
    manager = fleet(("B1", SMALL, {}), ("B2", (24, 23), {}))
    manager.selector.placement.set_fleet_needs({MODEL: 24})

    with pytest.raises(NoServer) as refused:
        picks(manager, 1)

    assert (refused.value.status, refused.value.code) == (503, "no_fit")
    assert "24 GB" in refused.value.message and MODEL in refused.value.message


def test_a_servers_own_need_wins_over_the_fleets_and_the_header_over_both():
    manager = fleet(("B1", SMALL, {}), ("B2", BIG, {}))
    manager.selector.placement.set_fleet_needs({MODEL: 24})
    assert picks(manager, 2) == ["B2", "B2"]

    manager.update_server("B1", {"model_memory_gb": {MODEL: 1}})  # on B1 it needs 1 GB: its 1.6 GB will do

    assert sorted(picks(manager, 4)) == ["B1", "B1", "B2", "B2"]

    assert picks(manager, 2, required_gb=30) == ["B2", "B2"]  # the client's 30 GB, on every server
    assert sorted(picks(manager, 2, required_gb=1)) == ["B1", "B2"]  # ... and its 1 GB on B2's 24 too


@pytest.mark.parametrize(
    ("declared", "requested", "options"),
    [
        pytest.param("llama3", "llama3:latest", {"models": ["llama3"]}, id="latest-is-implied"),
        pytest.param("llama3:latest", "llama3", {"models": ["llama3"]}, id="implied-latest"),
        pytest.param("qwen3:14b", "qwen3", {"model_map": {"qwen3": "qwen3:14b"}}, id="the-servers-own-name"),
        pytest.param("qwen3", "qwen3", {"model_map": {"qwen3": "qwen3:14b"}}, id="the-virtual-name"),
    ],
)
def test_a_need_matches_the_model_as_the_catalog_does(declared, requested, options):
    manager = fleet(("B1", SMALL, options), ("B2", BIG, options))

    manager.selector.placement.set_fleet_needs({declared: 24})

    assert picks(manager, 2, model=requested) == ["B2", "B2"]


def test_a_server_without_a_fresh_reading_is_the_last_resort_as_with_the_header():
    manager = fleet(("B1", None, {}), ("B2", SMALL, {}), ("B3", BIG, {}))
    manager.selector.placement.set_fleet_needs({MODEL: 24})
    assert picks(manager, 2) == ["B3", "B3"]

    manager.selector.placement.set_fleet_needs({MODEL: 70})

    assert picks(manager, 2) == ["B1", "B1"]  # nobody monitored fits: B1 might


def test_a_server_that_declares_no_need_is_used_only_when_none_where_it_fits_is():
    manager = fleet(("B1", BIG, {}), ("B2", BIG, {"model_memory_gb": {MODEL: 24}}))
    assert picks(manager, 2) == ["B2", "B2"]  # it fits there; B1 says nothing

    stale = parse_reading(gpu_report(80, 10), received=0.0)  # read long ago
    manager.apply_readings([("B2", manager.get_server("B2").monitor_url, stale)])

    assert sorted(picks(manager, 2)) == ["B1", "B2"]  # B2's room is unknown now, as B1's need is


def test_a_server_with_the_model_loaded_is_preferred_and_needs_no_room():
    manager = fleet(("B1", BIG, {}), ("B2", (24, 24), {}), ("B3", BIG, {}))
    assert picks(manager, 3) == ["B1", "B2", "B3"]

    loaded(manager, "B2", MODEL)

    assert picks(manager, 3) == ["B2", "B2", "B2"]  # no need declared: the loaded one alone
    manager.selector.placement.set_fleet_needs({MODEL: 24})
    assert picks(manager, 2) == ["B2", "B2"]  # its GPU is full, but the model is already in it
    assert picks(manager, 2, required_gb=30) == ["B2", "B2"]  # the header's need too


def test_loaded_is_preferred_under_the_servers_own_name_for_the_model():
    options = {"models": [], "model_map": {"qwen3": "qwen3:14b"}}
    manager = fleet(("B1", BIG, options), ("B2", BIG, options))

    loaded(manager, "B2", "qwen3:14b")

    assert picks(manager, 3, model="qwen3") == ["B2", "B2", "B2"]


def test_loaded_servers_share_the_work_by_the_policy():
    manager = fleet(("B1", BIG, {}), ("B2", BIG, {}), ("B3", BIG, {}))

    loaded(manager, "B1", MODEL)
    loaded(manager, "B3", MODEL, "llama3:8b")

    assert picks(manager, 4) == ["B1", "B3", "B1", "B3"]


def test_a_loaded_model_does_not_beat_the_tiers():
    manager = fleet(("B1", BIG, {"priority": 2}), ("B2", BIG, {}))

    loaded(manager, "B1", MODEL)

    assert picks(manager, 2) == ["B2", "B2"]  # within its tier a loaded server is first; tier 1 comes first


def test_a_loaded_server_at_its_cap_leaves_the_request_to_the_others():
    manager = fleet(("B1", BIG, {"max_concurrent": 1}), ("B2", BIG, {}))
    loaded(manager, "B1", MODEL)
    held = manager.acquire(RouteRequest(model=MODEL), timeout=0)
    assert held.server.server_id == "B1"

    assert picks(manager, 2) == ["B2", "B2"]
    held.release()


def test_plain_and_other_model_requests_ignore_needs_and_loaded_models():
    manager = fleet(("B1", (24, 24), {"models": [MODEL, "other"]}), ("B2", BIG, {"models": [MODEL, "other"]}))
    manager.selector.placement.set_fleet_needs({MODEL: 24})
    loaded(manager, "B2", MODEL)

    assert picks(manager, 4, model=None) == ["B1", "B2", "B1", "B2"]
    assert picks(manager, 4, model="other") == ["B1", "B2", "B1", "B2"]


@pytest.mark.parametrize(
    ("need", "required_gb"),
    [pytest.param({MODEL: 24}, None, id="a-models-need"), pytest.param({}, 24, id="the-header")],
)
def test_skip_resource_check_is_never_filtered_by_readings(need, required_gb):
    manager = fleet(("B1", (24, 24), {"skip_resource_check": True}), ("B2", BIG, {}), ("B3", SMALL, {}))
    manager.selector.placement.set_fleet_needs(need)

    assert picks(manager, 4, required_gb=required_gb) == ["B1", "B2", "B1", "B2"]


def test_skip_resource_check_keeps_a_server_without_a_reading_in_least_load():
    manager = fleet(("B1", None, {"skip_resource_check": True}), ("B2", BIG, {}), ("B3", None, {}), policy="least_load")

    assert picks(manager, 4) == ["B1", "B2", "B1", "B2"]  # B3, without a reading, comes after those with one


def test_hits_count_the_decisions_that_read_a_reading():
    manager = fleet(("B1", SMALL, {}), ("B2", BIG, {}), ("B3", None, {}))
    picks(manager, 3, model=None)
    picks(manager, 3)  # no need declared: no reading is read
    assert manager.selector.placement.hits == {}

    manager.selector.placement.set_fleet_needs({MODEL: 24})
    picks(manager, 3)

    assert manager.selector.placement.hits == {"B1": 3, "B2": 3}
