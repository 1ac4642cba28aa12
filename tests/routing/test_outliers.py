"""OutlierDetector: ejection after N failures, growing and capped durations, restore, threads."""

from concurrent.futures import ThreadPoolExecutor
from threading import Barrier

import pytest

from gateway.routing.outliers import OutlierDetector


class FakeClock:
    """A clock that moves only when a test says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def detector(clock: FakeClock) -> OutlierDetector:
    return OutlierDetector(consecutive_failures=3, base_seconds=30.0, max_seconds=100.0, clock=clock)


def fail(detector: OutlierDetector, server_id: str, times: int) -> list[float | None]:
    return [detector.record_failure(server_id) for _ in range(times)]


def test_nothing_ejected_at_first(detector):
    assert detector.ejected_ids() == frozenset()
    assert not detector.is_ejected("B1")
    assert detector.describe("B1") == {
        "ejected": False,
        "seconds_left": None,
        "ejections": 0,
        "consecutive_failures": 0,
    }


def test_ejects_at_the_nth_consecutive_failure(detector, clock):
    assert fail(detector, "B1", 3) == [None, None, 30.0]
    assert detector.ejected_ids() == {"B1"}
    assert detector.is_ejected("B1")
    assert not detector.is_ejected("B2")
    clock.advance(10)
    assert detector.describe("B1")["seconds_left"] == pytest.approx(20.0)


def test_failures_while_ejected_neither_extend_nor_repeat(detector, clock):
    fail(detector, "B1", 3)
    clock.advance(29)
    assert fail(detector, "B1", 10) == [None] * 10
    clock.advance(1)
    assert not detector.is_ejected("B1")
    assert detector.describe("B1")["ejections"] == 1


def test_success_resets_the_count(detector):
    fail(detector, "B1", 2)
    detector.record_success("B1")
    assert detector.describe("B1")["consecutive_failures"] == 0
    assert fail(detector, "B1", 3) == [None, None, 30.0]


def test_success_for_an_unknown_server_is_harmless(detector):
    detector.record_success("nobody")
    assert detector.describe("nobody")["consecutive_failures"] == 0


def test_ejections_grow_by_base_and_stop_at_max(detector, clock):
    lengths = []
    for _ in range(5):
        lengths.append(fail(detector, "B1", 3)[-1])
        clock.advance(lengths[-1] or 0)
        assert not detector.is_ejected("B1")
    assert lengths == [30.0, 60.0, 90.0, 100.0, 100.0]


def test_back_after_timer_with_count_zero(detector, clock):
    fail(detector, "B1", 3)
    clock.advance(30)
    assert detector.ejected_ids() == frozenset()
    assert detector.describe("B1") == {
        "ejected": False,
        "seconds_left": None,
        "ejections": 1,
        "consecutive_failures": 0,
    }
    assert fail(detector, "B1", 2) == [None, None]


def test_restore_brings_a_server_back_now(detector):
    fail(detector, "B1", 3)
    assert detector.restore("B1") is True
    assert not detector.is_ejected("B1")
    assert detector.restore("B1") is False
    assert detector.restore("nobody") is False
    assert detector.describe("B1")["ejections"] == 1
    assert fail(detector, "B1", 3)[-1] == 60.0


@pytest.mark.parametrize(("back_for", "next_length"), [(99, 60.0), (100, 30.0), (500, 30.0)])
def test_ejection_count_resets_after_max_seconds_back(detector, clock, back_for, next_length):
    fail(detector, "B1", 3)
    clock.advance(30 + back_for)  # the 30 s ejection, then time back in service
    assert fail(detector, "B1", 3)[-1] == next_length


def test_disabled_when_n_is_zero(clock):
    detector = OutlierDetector(consecutive_failures=0, clock=clock)
    assert fail(detector, "B1", 100) == [None] * 100
    assert detector.ejected_ids() == frozenset()


def test_servers_are_counted_separately(detector):
    fail(detector, "B1", 2)
    fail(detector, "B2", 2)
    assert detector.record_failure("B1") == 30.0
    assert detector.ejected_ids() == {"B1"}
    assert detector.record_failure("B2") == 30.0
    assert detector.ejected_ids() == {"B1", "B2"}


def test_several_timers_expire_each_in_turn(detector, clock):
    fail(detector, "B1", 3)
    clock.advance(10)
    fail(detector, "B2", 3)
    clock.advance(20)
    assert detector.ejected_ids() == {"B2"}
    clock.advance(10)
    assert detector.ejected_ids() == frozenset()


def test_forget_drops_a_server(detector):
    fail(detector, "B1", 3)
    detector.forget("B1")
    detector.forget("nobody")
    assert detector.ejected_ids() == frozenset()
    assert detector.describe("B1")["ejections"] == 0


def test_many_threads_crossing_the_threshold_eject_once(clock):
    detector = OutlierDetector(consecutive_failures=5, clock=clock)
    threads = 32
    barrier = Barrier(threads, timeout=30)  # a guard against a hang, not a timing check

    def hammer(_: int) -> list[float | None]:
        barrier.wait()
        results = []
        for _ in range(50):
            results.append(detector.record_failure("B1"))
            detector.ejected_ids()
        return results

    with ThreadPoolExecutor(max_workers=threads) as pool:
        results = [length for batch in pool.map(hammer, range(threads)) for length in batch]
    assert [length for length in results if length is not None] == [30.0]
    assert detector.describe("B1")["ejections"] == 1
