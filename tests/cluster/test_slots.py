"""SharedSlots on a real redis-server: the cap holds across processes, leases expire, the renewer keeps them."""

import threading
import time

import pytest

from gateway.cluster.connection import Redis, RedisUnavailable
from gateway.cluster.slots import SharedSlots
from tests.conftest import wait_until


@pytest.fixture
def stores(redis_server):
    """Two SharedSlots on two Redis objects: what two gateway processes hold."""
    made = []

    def build(ttl: float = 30.0) -> SharedSlots:
        slots = SharedSlots(Redis(redis_server.url, timeout=0.5), ttl=ttl)
        made.append(slots)
        return slots

    yield build
    for slots in made:
        slots.close()
        slots.redis.close()


def members(slots: SharedSlots, server_id: str) -> set[bytes]:
    return set(slots.redis.client.zrange(slots.key(server_id), 0, -1))


def test_take_never_exceeds_the_cap_across_two_processes(stores):
    first, second = stores(), stores()
    cap, lock = 2, threading.Lock()
    holding, most, taken = [0], [0], [0]
    deadline = time.monotonic() + 30

    def hammer(slots: SharedSlots) -> None:
        for _ in range(25):  # bounded in count and in time
            if time.monotonic() > deadline:
                return
            lease_id = slots.new_lease_id()
            if not slots.take("B1", cap, lease_id):
                continue
            with lock:
                holding[0] += 1
                most[0] = max(most[0], holding[0])
                taken[0] += 1
            time.sleep(0.001)
            with lock:
                holding[0] -= 1  # before the release: counted only while it surely holds the slot
            slots.release("B1", lease_id)

    threads = [threading.Thread(target=hammer, args=(slots,)) for slots in (first, second) for _ in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert taken[0] > 0
    assert most[0] <= cap
    assert members(first, "B1") == set()


def test_lease_ids_differ_between_processes(stores):
    first, second = stores(), stores()
    ids = {first.new_lease_id() for _ in range(100)} | {second.new_lease_id() for _ in range(100)}
    assert len(ids) == 200


def test_a_dead_process_frees_its_slots_within_the_ttl(stores):
    dead, alive = stores(ttl=0.3), stores(ttl=0.3)
    assert dead.take("B1", 1, dead.new_lease_id())
    dead.close()  # the process is gone: nobody renews or releases its lease
    assert not alive.take("B1", 1, alive.new_lease_id())
    assert wait_until(lambda: alive.take("B1", 1, alive.new_lease_id()), timeout=5)


def test_the_renewer_keeps_a_long_lease_alive(stores):
    streaming, other = stores(ttl=0.3), stores(ttl=0.3)
    lease_id = streaming.new_lease_id()
    assert streaming.take("B1", 1, lease_id)
    time.sleep(1.0)  # more than three TTLs: only renewals keep the lease
    assert not other.take("B1", 1, other.new_lease_id())
    assert members(streaming, "B1") == {lease_id.encode()}
    streaming.release("B1", lease_id)
    assert other.take("B1", 1, other.new_lease_id())


def test_renew_pushes_the_expiry_and_never_brings_back_a_released_lease(stores):
    slots = stores(ttl=60)
    kept, freed = slots.new_lease_id(), slots.new_lease_id()
    assert slots.take("B1", 5, kept) and slots.take("B1", 5, freed)
    before = slots.redis.client.zscore(slots.key("B1"), kept)
    slots.release("B1", freed)
    time.sleep(0.01)
    assert slots.renew() == 1
    assert slots.redis.client.zscore(slots.key("B1"), kept) > before
    assert members(slots, "B1") == {kept.encode()}


def test_a_lease_lost_before_its_renewal_is_logged_and_not_brought_back(stores, caplog):
    slots = stores(ttl=60)
    lease_id = slots.new_lease_id()
    assert slots.take("B1", 1, lease_id)
    slots.redis.client.delete(slots.key("B1"))  # as if Redis had been away longer than the TTL
    assert slots.renew() == 0
    assert members(slots, "B1") == set()
    assert "1 slots on B1 expired before they were renewed" in caplog.text


def test_a_take_without_a_cap_is_never_refused_and_counts(stores):
    first, second = stores(), stores()
    assert first.take("B1", 1, first.new_lease_id())
    assert not second.take("B1", 1, second.new_lease_id())
    assert second.take("B1", None, second.new_lease_id())  # a task's owner serves its own tasks
    assert first.counts(["B1", "B2"]) == {"B1": 2, "B2": 0}


def test_counts_leave_out_expired_leases(stores):
    slots = stores(ttl=0.2)
    assert slots.take("B1", 3, slots.new_lease_id())
    slots.close()  # no renewals
    assert wait_until(lambda: slots.counts(["B1"]) == {"B1": 0}, timeout=5)


def test_redis_down_is_one_exception(stores, redis_server):
    slots = stores()
    kept, freed = slots.new_lease_id(), slots.new_lease_id()
    assert slots.take("B1", 2, kept) and slots.take("B1", 2, freed)
    redis_server.kill()
    with pytest.raises(RedisUnavailable):
        slots.take("B1", 2, slots.new_lease_id())
    with pytest.raises(RedisUnavailable):
        slots.release("B1", freed)
    assert slots.held() == 1  # let go here all the same: nothing renews it, so it expires in Redis
    with pytest.raises(RedisUnavailable):
        slots.renew()
