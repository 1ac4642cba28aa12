"""Leases, concurrency caps and the wait queue, through BackendManager.acquire."""

import logging
import random
import threading
import time
from types import SimpleNamespace

import pytest

from gateway.cluster.connection import Redis
from gateway.cluster.slots import SharedSlots
from gateway.manager import BackendManager
from gateway.routing.admission import NoServer, RouteRequest
from tests.conftest import wait_until


def capped(max_concurrent: int = 1, servers: int = 1, queue_max_size: int = 100) -> BackendManager:
    manager = BackendManager()
    manager.queue_max_size = queue_max_size
    for i in range(servers):
        manager.register_server(f"B{i + 1}", "127.0.0.1", 9000 + i, options={"max_concurrent": max_concurrent})
    return manager


def in_flight(manager: BackendManager) -> dict[str, int]:
    return {row["server_id"]: row["in_flight"] for row in manager.describe_servers()}


def test_a_request_waits_for_a_slot_and_gets_it_when_one_frees():
    manager = capped()
    held = manager.acquire(RouteRequest(), timeout=0)
    got = []
    waiter = threading.Thread(target=lambda: got.append(manager.acquire(RouteRequest(), timeout=30)))
    waiter.start()
    assert wait_until(lambda: len(manager.admission.waiters) == 1)
    assert got == []
    held.release()
    waiter.join(timeout=10)
    assert [lease.server.server_id for lease in got] == ["B1"]
    assert in_flight(manager) == {"B1": 1}  # the slot passed straight to the waiter


def test_waiters_are_served_first_come_first_served():
    manager = capped()
    held = manager.acquire(RouteRequest(), timeout=0)
    order: list[int] = []
    leases = []

    def wait(number: int) -> None:
        lease = manager.acquire(RouteRequest(), timeout=30)
        order.append(number)
        leases.append(lease)

    threads = []
    for number in range(5):
        thread = threading.Thread(target=wait, args=(number,))
        thread.start()
        threads.append(thread)
        assert wait_until(lambda n=number: len(manager.admission.waiters) == n + 1)
    held.release()
    for _ in range(5):
        assert wait_until(lambda: leases)
        leases.pop().release()
    for thread in threads:
        thread.join(timeout=10)
    assert order == [0, 1, 2, 3, 4]


def test_the_wait_ends_with_a_503_after_the_queue_timeout():
    manager = capped()
    manager.acquire(RouteRequest(), timeout=0)
    with pytest.raises(NoServer) as caught:
        manager.acquire(RouteRequest(), timeout=0.2)
    assert (caught.value.status, caught.value.code, caught.value.retry_after) == (503, "queue_timeout", "1")
    assert len(manager.admission.waiters) == 0


@pytest.mark.parametrize(("timeout", "queue_max_size"), [(0, 100), (30, 0)])
def test_no_room_to_wait_is_an_immediate_503(timeout, queue_max_size):
    manager = capped(queue_max_size=queue_max_size)
    manager.acquire(RouteRequest(), timeout=0)
    with pytest.raises(NoServer) as caught:
        manager.acquire(RouteRequest(), timeout=timeout)
    assert (caught.value.status, caught.value.code) == (503, "queue_full")


def test_a_waiter_is_told_when_its_server_leaves():
    manager = capped()
    manager.acquire(RouteRequest(), timeout=0)
    errors: list[NoServer] = []

    def wait() -> None:
        try:
            manager.acquire(RouteRequest(), timeout=30)
        except NoServer as exc:
            errors.append(exc)

    thread = threading.Thread(target=wait)
    thread.start()
    assert wait_until(lambda: len(manager.admission.waiters) == 1)
    manager.unregister_server("B1")
    thread.join(timeout=10)
    assert [exc.code for exc in errors] == ["no_server"]


def test_counts_stay_exact_under_many_threads_and_never_go_below_zero():
    manager = capped(max_concurrent=3, servers=3)
    manager.routing_policy = "least_connections"
    peak: dict[str, int] = {}
    lock = threading.Lock()

    def client(seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(200):
            lease = manager.acquire(RouteRequest(), timeout=30)
            counts = in_flight(manager)
            with lock:
                for server_id, count in counts.items():
                    peak[server_id] = max(peak.get(server_id, 0), count)
            if rng.random() < 0.5:
                lease.release()  # a client that disconnected: released twice, once by each path
            lease.release()

    threads = [threading.Thread(target=client, args=(seed,)) for seed in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert in_flight(manager) == {"B1": 0, "B2": 0, "B3": 0}
    assert max(peak.values()) <= 3  # the cap held
    assert manager.admission.in_flight == {}


# -- max_concurrent across processes (REDIS_URL): the slots are shared in Redis -------------------


@pytest.fixture
def cluster(redis_server):
    """Managers and bare SharedSlots on one redis-server, each as another gateway process would be."""
    made: list[SharedSlots] = []

    def slots() -> SharedSlots:
        made.append(SharedSlots(Redis(redis_server.url, timeout=0.5)))
        return made[-1]

    def manager(max_concurrent: int = 1, servers: int = 1) -> BackendManager:
        built = capped(max_concurrent, servers)
        built.shared_slots = slots()
        return built

    yield SimpleNamespace(slots=slots, manager=manager)
    for made_slots in made:
        made_slots.close()
        made_slots.redis.close()


def shared_count(manager: BackendManager, server_id: str = "B1") -> int:
    assert manager.shared_slots is not None
    return manager.shared_slots.counts([server_id])[server_id]


def test_a_server_full_across_the_cluster_is_passed_over_for_one_with_room(cluster):
    manager, other = cluster.manager(servers=2), cluster.slots()
    assert other.take("B1", 1, other.new_lease_id())
    lease = manager.acquire(RouteRequest(), timeout=0)  # round robin starts at B1, which is full elsewhere
    assert lease.server.server_id == "B2"
    assert manager.admission.in_flight == {"B2": 1}  # B1's local slot was given back
    lease.release()
    assert (shared_count(manager, "B2"), manager.admission.in_flight) == (0, {})


def test_a_request_waits_while_the_cluster_is_full_and_gets_the_slot_another_process_frees(cluster):
    manager, other = cluster.manager(), cluster.slots()
    held = other.new_lease_id()
    assert other.take("B1", 1, held)
    got = []
    waiter = threading.Thread(target=lambda: got.append(manager.acquire(RouteRequest(), timeout=30)))
    waiter.start()
    assert wait_until(lambda: len(manager.admission.waiters) == 1)
    assert got == [] and manager.admission.in_flight == {}
    other.release("B1", held)  # wakes nobody here: the waiter looks again on its own
    waiter.join(timeout=10)
    assert [lease.server.server_id for lease in got] == ["B1"]
    assert (shared_count(manager), manager.admission.in_flight, len(manager.admission.waiters)) == (1, {"B1": 1}, 0)
    got[0].release()
    assert shared_count(manager) == 0


@pytest.mark.parametrize(("timeout", "code"), [(0, "queue_full"), (0.3, "queue_timeout")])
def test_a_cluster_that_stays_full_ends_in_a_503(cluster, timeout, code):
    manager, other = cluster.manager(), cluster.slots()
    assert other.take("B1", 1, other.new_lease_id())
    with pytest.raises(NoServer) as caught:
        manager.acquire(RouteRequest(), timeout=timeout)
    assert (caught.value.status, caught.value.code) == (503, code)
    assert "max_concurrent" in caught.value.message
    assert (manager.admission.in_flight, len(manager.admission.waiters), shared_count(manager)) == ({}, 0, 1)


def test_the_cap_holds_across_two_managers_hammered_from_many_threads(cluster):
    managers = [cluster.manager(max_concurrent=2), cluster.manager(max_concurrent=2)]
    lock, holding, most, served = threading.Lock(), [0], [0], [0]

    def client(manager: BackendManager) -> None:
        for _ in range(5):
            lease = manager.acquire(RouteRequest(), timeout=30)
            try:
                with lock:
                    holding[0] += 1
                    most[0] = max(most[0], holding[0])
                    served[0] += 1
                time.sleep(0.005)
                with lock:
                    holding[0] -= 1
            finally:
                lease.release()

    threads = [threading.Thread(target=client, args=(manager,)) for manager in managers for _ in range(10)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert served[0] == 100
    assert most[0] <= 2
    assert shared_count(managers[0]) == 0
    assert [m.admission.in_flight for m in managers] == [{}, {}]


def test_a_task_owner_holds_a_shared_slot_past_the_cap(cluster):
    manager, other = cluster.manager(), cluster.slots()
    assert other.take("B1", 1, other.new_lease_id())
    lease = manager.hold("B1")
    assert lease.server.server_id == "B1"
    assert shared_count(manager) == 2  # counted, so that the others wait for it too
    lease.release()
    assert (shared_count(manager), manager.admission.in_flight) == (1, {})


def test_with_redis_down_each_process_enforces_the_cap_alone(cluster, redis_server, caplog):
    caplog.set_level(logging.INFO, "gateway.routing.admission")
    manager = cluster.manager()
    redis_server.kill()
    lease = manager.acquire(RouteRequest(), timeout=0)
    assert lease.server.server_id == "B1"
    with pytest.raises(NoServer) as caught:  # the local cap still holds
        manager.acquire(RouteRequest(), timeout=0)
    assert caught.value.code == "queue_full"
    lease.release()  # no exception: the slot, if Redis had it, expires
    manager.acquire(RouteRequest(), timeout=0).release()
    assert caplog.text.count("each gateway process enforces max_concurrent on its own") == 1
    redis_server.start()
    lease = manager.acquire(RouteRequest(), timeout=0)
    assert shared_count(manager) == 1
    assert "max_concurrent holds across the gateway processes" in caplog.text
    lease.release()
    assert shared_count(manager) == 0


def test_an_error_taking_the_shared_slot_frees_the_local_one(cluster, monkeypatch):
    manager = cluster.manager()

    def broken(*args, **kwargs):
        raise RuntimeError("unforeseen")

    monkeypatch.setattr(manager.shared_slots, "take", broken)
    with pytest.raises(RuntimeError):
        manager.acquire(RouteRequest(), timeout=0)
    with pytest.raises(RuntimeError):
        manager.hold("B1")
    assert manager.admission.in_flight == {}
    monkeypatch.undo()
    assert shared_count(manager) == 0


def test_an_error_freeing_the_shared_slot_still_frees_the_local_one(cluster, monkeypatch):
    manager = cluster.manager()
    lease = manager.acquire(RouteRequest(), timeout=0)

    def broken(*args, **kwargs):
        raise RuntimeError("unforeseen")

    monkeypatch.setattr(manager.shared_slots, "release", broken)
    with pytest.raises(RuntimeError):
        lease.release()
    assert manager.admission.in_flight == {}
    lease.release()  # once only: nothing more happens
    assert manager.admission.in_flight == {}


def test_the_servers_report_shows_the_cluster_count_of_capped_servers(cluster, redis_server):
    manager, other = cluster.manager(max_concurrent=3), cluster.slots()
    manager.register_server("U1", "127.0.0.1", 9100)  # no cap: nothing counts it in Redis
    assert other.take("B1", 3, other.new_lease_id())
    lease = manager.acquire(RouteRequest(), timeout=0)
    rows = {row["server_id"]: row for row in manager.describe_servers()}
    assert (rows["B1"]["in_flight"], rows["B1"]["cluster_in_flight"]) == (1, 2)
    assert rows["U1"]["cluster_in_flight"] is None
    assert manager.describe_server("B1")["cluster_in_flight"] == 2
    lease.release()
    redis_server.kill()
    assert manager.describe_server("B1")["cluster_in_flight"] is None  # the report still answers


def test_without_redis_the_report_is_as_it_was():
    assert "cluster_in_flight" not in capped().describe_servers()[0]
