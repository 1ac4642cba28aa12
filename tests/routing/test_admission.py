"""Leases, concurrency caps and the wait queue, through BackendManager.acquire."""

import random
import threading

import pytest

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
