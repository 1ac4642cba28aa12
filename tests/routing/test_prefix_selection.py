"""ROUTING_POLICY=prefix through BackendManager: it chooses among the candidates left after models, drain,
health, ejection, caps and tiers, and falls back to round-robin."""

import collections

import pytest

from gateway.fleet.health import HealthResult
from gateway.fleet.store import JsonFileStore
from gateway.manager import BackendManager
from gateway.routing.admission import NoServer, RouteRequest
from gateway.routing.prefix import prefix_hashes

MODEL = "llama3:8b"


def make_manager(tmp_path, *names: str, **options) -> BackendManager:
    manager = BackendManager(JsonFileStore(tmp_path / "servers.json"))
    manager.load()
    manager.routing_policy = "prefix"
    for port, name in enumerate(names, start=9000):
        manager.register_server(name, "127.0.0.1", port, options={"models": [MODEL], **options})
    return manager


def conversation(n: int, turns: int) -> RouteRequest:
    """Conversation n after `turns` turns: its own long system prompt, then the turns so far."""
    messages = [{"role": "system", "content": f"You are assistant number {n}. " * 20}]
    for turn in range(turns):
        messages += [{"role": "user", "content": f"question {turn} " * 20}]
        messages += [{"role": "assistant", "content": f"answer {turn} " * 20}]
    messages.append({"role": "user", "content": f"question {turns} " * 20})
    return RouteRequest(model=MODEL, prefix=prefix_hashes(MODEL, {"messages": messages}))


def served(manager: BackendManager, route: RouteRequest) -> str:
    lease = manager.acquire(route, timeout=0)
    lease.release()
    return lease.server.server_id


def test_each_conversation_keeps_its_server_and_new_ones_are_placed_round_robin(tmp_path):
    manager = make_manager(tmp_path, "B1", "B2", "B3")
    first = [served(manager, conversation(n, 0)) for n in range(5)]  # 5, so plain rotation would shift a place
    assert first == ["B1", "B2", "B3", "B1", "B2"]
    for turns in range(1, 5):
        assert [served(manager, conversation(n, turns)) for n in range(5)] == first


def test_under_round_robin_the_same_turns_spread(tmp_path):
    manager = make_manager(tmp_path, "B1", "B2", "B3")
    manager.routing_policy = "round_robin"
    assert len({served(manager, conversation(0, turns)) for turns in range(6)}) == 3


@pytest.mark.parametrize("leave", ["unregister", "drain", "unhealthy", "eject"])
def test_a_server_that_leaves_hands_its_conversations_to_others_and_they_stay_there(tmp_path, leave):
    manager = make_manager(tmp_path, "B1", "B2", "B3")
    manager.outliers.__init__(consecutive_failures=3, base_seconds=30.0, max_seconds=300.0)
    placed = {n: served(manager, conversation(n, 0)) for n in range(6)}
    if leave == "unregister":
        manager.unregister_server("B1")
    elif leave == "drain":
        manager.set_draining("B1", True)
    elif leave == "unhealthy":
        url = manager.get_server("B1").url
        for _ in range(manager.failure_threshold):
            manager.apply_health_results([HealthResult("B1", url, False, "down")])
    else:
        for _ in range(3):
            manager.report_result("B1", False, "HTTP 500")
    moved = {n: served(manager, conversation(n, 1)) for n in range(6)}
    assert "B1" not in moved.values()
    assert all(moved[n] == placed[n] for n in placed if placed[n] != "B1")  # the others stay where they were
    assert len({moved[n] for n in placed if placed[n] == "B1"}) == 2  # B1's two, spread round-robin
    for turns in (2, 3):
        assert {n: served(manager, conversation(n, turns)) for n in range(6)} == moved


def test_within_the_load_slack_a_conversation_stays_home_while_its_server_serves_others(tmp_path):
    manager = make_manager(tmp_path, "B1", "B2", "B3")
    assert served(manager, conversation(0, 0)) == "B1"
    held = [manager.acquire(conversation(0, 1), timeout=0) for _ in range(5)]
    # Over the bound from the second on, but under PREFIX_LOAD_SLACK's 4 until the fifth.
    assert [lease.server.server_id for lease in held] == ["B1", "B1", "B1", "B1", "B2"]
    for lease in held:
        lease.release()


def test_over_the_load_bound_a_conversation_spills_over_then_returns(tmp_path):
    manager = make_manager(tmp_path, "B1", "B2", "B3")
    manager.selector.prefix.load_slack = 0  # the bound alone
    assert served(manager, conversation(0, 0)) == "B1"
    held = [manager.acquire(conversation(0, 1), timeout=0) for _ in range(2)]
    # B1 holds 1 of 1 in flight, then: cap ceil(1.25 x 2 / 3) = 1, so the second went elsewhere.
    assert [lease.server.server_id for lease in held] == ["B1", "B2"]
    for lease in held:
        lease.release()
    assert served(manager, conversation(0, 2)) in ("B1", "B2")  # both hold its prefix now


def test_a_capped_server_full_passes_its_conversations_on(tmp_path):
    manager = make_manager(tmp_path, "B1", "B2", max_concurrent=1)
    assert served(manager, conversation(0, 0)) == "B1"
    busy = manager.hold("B1")  # B1's one slot, taken
    other = manager.acquire(conversation(0, 1), timeout=0)
    assert other.server.server_id == "B2"
    with pytest.raises(NoServer, match="max_concurrent"):
        manager.acquire(conversation(0, 2), timeout=0)
    busy.release()
    other.release()


def test_tiers_and_models_come_first(tmp_path):
    manager = make_manager(tmp_path, "MAIN1", "MAIN2")
    manager.register_server("BACKUP", "127.0.0.1", 9100, options={"models": [MODEL], "priority": 2})
    manager.register_server("OTHER", "127.0.0.1", 9101, options={"models": ["qwen2:7b"]})
    assert {served(manager, conversation(n, 0)) for n in range(4)} == {"MAIN1", "MAIN2"}
    manager.set_draining("MAIN1", True)
    manager.set_draining("MAIN2", True)
    assert {served(manager, conversation(n, 1)) for n in range(4)} == {"BACKUP"}
    manager.set_draining("MAIN1", False)
    manager.set_draining("MAIN2", False)
    # BACKUP served them last, but tier 1 is back: they return there.
    assert {served(manager, conversation(n, 2)) for n in range(4)} <= {"MAIN1", "MAIN2"}


def test_a_session_key_wins_over_the_prefix(tmp_path):
    manager = make_manager(tmp_path, "B1", "B2", "B3")
    keyed = [served(manager, RouteRequest(MODEL, "user-7", None, conversation(n, 0).prefix)) for n in range(6)]
    assert len(set(keyed)) == 1


def test_plain_requests_rotate_as_round_robin(tmp_path):
    manager = make_manager(tmp_path, "B1", "B2", "B3")
    assert [served(manager, RouteRequest()) for _ in range(6)] == ["B1", "B2", "B3"] * 2
    (tmp_path / "w").mkdir()
    weighted = make_manager(tmp_path / "w", "W1")
    weighted.register_server("W2", "127.0.0.1", 9200, options={"weight": 2})
    counts = collections.Counter(served(weighted, RouteRequest()) for _ in range(30))
    assert counts == {"W1": 10, "W2": 20}
