"""Routing through BackendManager: weights, tiers, models, drain, sticky keys, ejection, slow start."""

import collections
import json

import pytest

from gateway.fleet.health import HealthResult
from gateway.fleet.store import JsonFileStore
from gateway.manager import BackendManager
from gateway.routing.admission import NoServer, RouteRequest


def make_manager(tmp_path, **options) -> BackendManager:
    manager = BackendManager(JsonFileStore(tmp_path / "servers.json"))
    manager.load()
    for name, value in options.items():
        setattr(manager, name, value)
    return manager


def add(manager: BackendManager, server_id: str, port: int = 9000, **options) -> None:
    manager.register_server(server_id, "127.0.0.1", port, options=options)


def picks(manager: BackendManager, count: int, route: RouteRequest | None = None) -> list[str]:
    route = route or RouteRequest()
    chosen = []
    for _ in range(count):
        lease = manager.acquire(route, timeout=0)
        chosen.append(lease.server.server_id)
        lease.release()
    return chosen


def set_health(manager: BackendManager, server_id: str, ok: bool) -> None:
    url = manager.get_server(server_id).url
    for _ in range(manager.failure_threshold):
        manager.apply_health_results([HealthResult(server_id, url, ok, "test")])


def test_equal_weights_keep_the_seeds_strict_rotation(tmp_path):
    manager = make_manager(tmp_path)
    for name in ("B1", "B2", "B3"):
        add(manager, name)
    assert picks(manager, 6) == ["B1", "B2", "B3", "B1", "B2", "B3"]


def test_weights_1_to_2_give_exactly_100_to_200_over_300_picks(tmp_path):
    manager = make_manager(tmp_path)
    add(manager, "B1", weight=1)
    add(manager, "B2", weight=2)
    chosen = picks(manager, 300)
    assert collections.Counter(chosen) == {"B1": 100, "B2": 200}
    assert chosen[:3] == ["B2", "B1", "B2"]  # smooth: never B2 B2 B1 bunching at the start


def test_tier_two_is_used_only_while_no_tier_one_server_can_take_work(tmp_path):
    manager = make_manager(tmp_path)
    add(manager, "MAIN1", priority=1)
    add(manager, "MAIN2", priority=1)
    add(manager, "BACKUP", priority=2)
    assert set(picks(manager, 10)) == {"MAIN1", "MAIN2"}

    set_health(manager, "MAIN1", False)
    set_health(manager, "MAIN2", False)
    assert set(picks(manager, 4)) == {"BACKUP"}

    set_health(manager, "MAIN2", True)
    assert set(picks(manager, 4)) == {"MAIN2"}


def test_a_full_tier_one_overflows_to_tier_two(tmp_path):
    manager = make_manager(tmp_path)
    add(manager, "MAIN", priority=1, max_concurrent=1)
    add(manager, "BACKUP", priority=2)
    held = manager.acquire(RouteRequest(), timeout=0)
    assert held.server.server_id == "MAIN"
    assert picks(manager, 2) == ["BACKUP", "BACKUP"]
    held.release()
    assert picks(manager, 1) == ["MAIN"]


def test_a_drained_server_takes_no_new_work_but_keeps_its_tasks(tmp_path):
    manager = make_manager(tmp_path)
    add(manager, "B1")
    add(manager, "B2")
    manager.set_draining("B1", True)
    assert set(picks(manager, 6)) == {"B2"}
    owned = manager.hold("B1")  # the proxy's path for a request about a task B1 owns
    assert owned.server.server_id == "B1"
    assert manager.describe_server("B1")["in_flight"] == 1
    owned.release()
    manager.set_draining("B1", False)
    assert set(picks(manager, 6)) == {"B1", "B2"}


def test_draining_and_options_survive_a_restart(tmp_path):
    manager = make_manager(tmp_path)
    add(
        manager,
        "B1",
        weight=3,
        priority=2,
        max_concurrent=4,
        models=["llama3"],
        labels={"zone": "a"},
        max_allocations=5,
    )
    manager.set_draining("B1", True)

    (server,) = make_manager(tmp_path).list_servers()
    assert server.options() == {
        "weight": 3,
        "priority": 2,
        "max_concurrent": 4,
        "models": ["llama3"],
        "model_map": {},
        "labels": {"zone": "a"},
        "model_memory_gb": {},
        "type": "gpu",
        "description": "",
        "skip_resource_check": False,
        "max_allocations": 5,
    }
    assert server.draining


def test_a_heartbeat_without_options_keeps_what_the_operator_set(tmp_path):
    manager = make_manager(tmp_path)
    add(manager, "B1")
    manager.update_server("B1", {"weight": 5})
    manager.set_draining("B1", True)
    saved = (tmp_path / "servers.json").stat().st_mtime_ns

    add(manager, "B1")  # the agent's heartbeat: same address, no options

    server = manager.get_server("B1")
    assert (server.weight, server.draining) == (5, True)
    assert (tmp_path / "servers.json").stat().st_mtime_ns == saved  # nothing to write


def test_new_options_at_the_same_address_keep_health(tmp_path):
    manager = make_manager(tmp_path)
    add(manager, "B1")
    set_health(manager, "B1", False)
    add(manager, "B1", weight=2)
    server = manager.get_server("B1")
    assert (server.weight, server.is_healthy) == (2, False)


def test_a_move_resets_health_and_keeps_options(tmp_path):
    manager = make_manager(tmp_path)
    add(manager, "B1", weight=4, models=["m"])
    set_health(manager, "B1", False)
    add(manager, "B1", port=9001)
    server = manager.get_server("B1")
    assert (server.port, server.is_healthy, server.weight, server.models) == (9001, True, 4, ["m"])


def test_models_route_and_map_to_the_servers_own_names(tmp_path):
    manager = make_manager(tmp_path)
    add(manager, "LLAMA", models=["llama3:8b"])
    add(manager, "QWEN", model_map={"qwen3": "qwen3:14b"})
    for _ in range(3):
        lease = manager.acquire(RouteRequest(model="qwen3"), timeout=0)
        assert (lease.server.server_id, lease.actual_model) == ("QWEN", "qwen3:14b")
        lease.release()
    lease = manager.acquire(RouteRequest(model="llama3:8b"), timeout=0)
    assert (lease.server.server_id, lease.actual_model) == ("LLAMA", "llama3:8b")


def test_an_untagged_name_matches_the_latest_tag(tmp_path):
    manager = make_manager(tmp_path)
    add(manager, "B1", models=["llama3:latest"])
    lease = manager.acquire(RouteRequest(model="llama3"), timeout=0)
    assert (lease.server.server_id, lease.actual_model) == ("B1", "llama3:latest")


@pytest.mark.parametrize(
    ("fleet", "status", "code"),
    [
        ({"B1": ["llama3"]}, 404, "model_not_found"),
        ({}, 503, "no_server"),
    ],
)
def test_a_model_no_server_has(tmp_path, fleet, status, code):
    manager = make_manager(tmp_path)
    for name, models in fleet.items():
        add(manager, name, models=models)
    with pytest.raises(NoServer) as caught:
        manager.acquire(RouteRequest(model="mistral"), timeout=0)
    assert (caught.value.status, caught.value.code, caught.value.fallback_ok) == (status, code, True)


def test_a_model_whose_servers_are_all_down_is_503_not_404(tmp_path):
    manager = make_manager(tmp_path)
    add(manager, "B1", models=["llama3"])
    add(manager, "B2", models=["qwen3"])
    set_health(manager, "B1", False)
    with pytest.raises(NoServer) as caught:
        manager.acquire(RouteRequest(model="llama3"), timeout=0)
    assert (caught.value.status, caught.value.code, caught.value.fallback_ok) == (503, "model_unavailable", False)


def test_servers_with_no_known_models_take_a_model_nobody_declares(tmp_path):
    manager = make_manager(tmp_path)
    add(manager, "KNOWN", models=["llama3"])
    add(manager, "OPAQUE")
    lease = manager.acquire(RouteRequest(model="mistral"), timeout=0)
    assert (lease.server.server_id, lease.actual_model) == ("OPAQUE", None)  # forwarded as the client named it


def test_discovered_models_route_and_are_kept(tmp_path):
    manager = make_manager(tmp_path)
    add(manager, "B1")
    add(manager, "B2", models=["declared"])
    url1, url2 = manager.get_server("B1").url, manager.get_server("B2").url
    manager.apply_discovered([("B1", url1, ["phi3:latest"]), ("B2", url2, ["ignored"])])

    lease = manager.acquire(RouteRequest(model="phi3"), timeout=0)
    assert (lease.server.server_id, lease.actual_model) == ("B1", "phi3:latest")
    assert manager.get_server("B2").discovered_models == []  # registered models win
    assert manager.model_catalog() == {"declared": ["B2"], "phi3:latest": ["B1"]}
    stored = json.loads((tmp_path / "servers.json").read_text())
    assert stored[0]["discovered_models"] == ["phi3:latest"]


def test_the_catalog_shows_virtual_names_of_servers_that_can_take_work(tmp_path):
    manager = make_manager(tmp_path)
    add(manager, "B1", models=["qwen3:14b", "llama3"], model_map={"qwen3": "qwen3:14b"})
    add(manager, "B2", models=["llama3"])
    add(manager, "B3", models=["gemma"])
    manager.set_draining("B3", True)
    assert manager.model_catalog() == {"llama3": ["B1", "B2"], "qwen3": ["B1"]}


def test_a_sticky_key_stays_while_other_servers_come_and_go(tmp_path):
    manager = make_manager(tmp_path)
    for name in ("B1", "B2", "B3", "B4"):
        add(manager, name)
    keys = [f"user-{i}" for i in range(200)]
    before = {key: picks(manager, 1, RouteRequest(session_key=key))[0] for key in keys}
    assert len(set(before.values())) == 4

    manager.unregister_server("B4")
    add(manager, "B5")
    after = {key: picks(manager, 1, RouteRequest(session_key=key))[0] for key in keys}
    moved = {key for key in keys if before[key] != after[key]}
    assert moved == {key for key in keys if before[key] == "B4"} | {key for key in keys if after[key] == "B5"}
    assert all(before[key] == "B4" or after[key] == "B5" for key in moved)


def test_least_connections_sends_work_to_the_least_busy(tmp_path):
    manager = make_manager(tmp_path, routing_policy="least_connections")
    add(manager, "B1")
    add(manager, "B2", weight=2)
    held = [manager.acquire(RouteRequest(), timeout=0) for _ in range(6)]
    counts = collections.Counter(lease.server.server_id for lease in held)
    assert counts == {"B1": 2, "B2": 4}  # in flight per unit of weight stays level
    for lease in held:
        lease.release()
        lease.release()  # a second release changes nothing
    assert [row["in_flight"] for row in manager.describe_servers()] == [0, 0]


def test_consecutive_failures_eject_a_server_until_a_health_check_passes(tmp_path):
    manager = make_manager(tmp_path)
    manager.outliers.__init__(consecutive_failures=3, base_seconds=30.0, max_seconds=300.0)
    add(manager, "B1")
    add(manager, "B2")
    for _ in range(3):
        manager.report_result("B1", False, "HTTP 500")
    assert set(picks(manager, 4)) == {"B2"}
    assert manager.describe_server("B1")["ejected"]

    manager.apply_health_results([HealthResult("B1", manager.get_server("B1").url, True, "ok")])
    assert set(picks(manager, 4)) == {"B1", "B2"}


def test_slow_start_ramps_a_recovered_servers_weight(tmp_path):
    manager = make_manager(tmp_path)
    manager.selector.slow_start_seconds = 3600.0
    add(manager, "B1", weight=10)
    assert manager.describe_server("B1")["effective_weight"] == pytest.approx(1.0, abs=0.01)  # 10% at once
    manager.selector.slow_start_seconds = 0.0
    assert manager.describe_server("B1")["effective_weight"] == 10


def test_unknown_options_are_refused(tmp_path):
    manager = make_manager(tmp_path)
    with pytest.raises(ValueError, match="colour"):
        manager.register_server("B1", "127.0.0.1", 1, options={"colour": "red"})
    assert manager.list_servers() == []
