"""The dashboard's ring buffer of recent requests: buckets, rates, p95, rotation, and its hook in the metrics."""

from __future__ import annotations

import tracemalloc

import pytest

from gateway.observability import history
from gateway.observability.history import BUCKET_SECONDS, BUCKETS, FLEET, RequestHistory, quantile
from gateway.observability.metrics import GatewayMetrics


class Clock:
    """A monotonic clock the test moves by hand."""

    def __init__(self, now: float = 100_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def recent(clock: Clock) -> RequestHistory:
    return RequestHistory(clock)


def test_a_full_bucket_is_its_count_over_ten_seconds_and_the_current_one_the_last_ten_seconds(recent, clock):
    for _ in range(30):
        recent.record("B1", 200, 0.02)
    clock.now += BUCKET_SECONDS  # the next bucket begins
    for _ in range(4):
        recent.record("B1", 200, 0.02)
    clock.now += 2  # 2 s into it: the last 10 s are its 4 requests and 8 s of the previous bucket's 30
    charts = recent.charts("B1")
    assert [len(charts[name]) for name in ("rps", "error_rate", "p95_s")] == [BUCKETS] * 3
    assert charts["rps"][-2:] == [3.0, pytest.approx((4 + 30 * 0.8) / 10)]
    assert charts["rps"][:-2] == [0.0] * (BUCKETS - 2)  # no requests: a rate of zero, which is data
    clock.now += 8  # a bucket without requests begins: the previous one's still count, all of them
    assert recent.charts("B1")["rps"][-2:] == [0.4, 0.4]


def test_a_bucket_without_requests_has_no_error_rate_or_p95(recent):
    charts = recent.charts("B1")  # never seen: nothing recorded at all
    assert charts["error_rate"] == [None] * BUCKETS and charts["p95_s"] == [None] * BUCKETS
    recent.record("B1", 200, 0.02)
    charts = recent.charts("B1")
    assert charts["error_rate"][-1] == 0.0 and charts["p95_s"][-1] is not None
    assert charts["error_rate"][:-1] == [None] * (BUCKETS - 1)


@pytest.mark.parametrize(
    ("status", "error"), [(200, False), (304, False), (404, False), (499, False), (500, True), (503, True)]
)
def test_a_5xx_is_an_error_and_nothing_else_is(recent, status, error):
    recent.record("B1", 200, 0.01)
    recent.record("B1", status, 0.01)
    assert recent.charts("B1")["error_rate"][-1] == (0.5 if error else 0.0)


def test_p95_is_interpolated_within_its_bin_as_prometheus_does(recent):
    for _ in range(90):
        recent.record("B1", 200, 0.02)  # the (0.01, 0.025] bin
    for _ in range(10):
        recent.record("B1", 200, 0.4)  # the (0.25, 0.5] bin
    assert recent.charts("B1")["p95_s"][-1] == pytest.approx(0.25 + 0.25 * (95 - 90) / 10)


@pytest.mark.parametrize(
    ("bins", "expected"),
    [
        ([100] + [0] * 15, 0.005 * 0.95),  # all in the first bin: from 0
        ([0] * 15 + [7], 300.0),  # past the last bound: that bound, as histogram_quantile says
        ([0, 0, 0, 0, 0, 10] + [0] * 10, 0.1 + 0.15 * 0.95),
    ],
)
def test_quantile(bins, expected):
    assert quantile(0.95, bins) == pytest.approx(expected)


def test_a_latency_on_a_bound_falls_in_that_bounds_bin(recent):
    recent.record("B1", 200, 0.005)
    assert recent.charts("B1")["p95_s"][-1] == pytest.approx(0.005 * 0.95)


def test_fifteen_minutes_later_a_bucket_is_gone_and_its_slot_starts_afresh(recent, clock):
    for _ in range(50):
        recent.record("B1", 500, 10.0)
    clock.now += (BUCKETS - 1) * BUCKET_SECONDS
    assert recent.charts("B1")["rps"][0] == 5.0  # the oldest bucket still shown: 50 requests in 10 s
    clock.now += BUCKET_SECONDS  # now its slot holds the current bucket, not yet written
    charts = recent.charts("B1")
    assert charts["rps"] == [0.0] * BUCKETS and charts["error_rate"] == [None] * BUCKETS
    recent.record("B1", 200, 0.02)  # the slot is reused: only this request is in it
    charts = recent.charts("B1")
    assert charts["rps"][-1] == 0.1 and charts["error_rate"][-1] == 0.0
    assert charts["p95_s"][-1] == pytest.approx(0.01 + 0.015 * 0.95)


def test_the_fleet_counts_every_server_and_a_server_only_its_own(recent):
    recent.record("B1", 200, 0.02)
    recent.record("B2", 500, 0.02)
    recent.record("none", 503, 0.001)  # no server had it: the fleet's error all the same
    assert recent.charts(FLEET)["rps"][-1] == 0.3
    assert recent.charts(FLEET)["error_rate"][-1] == pytest.approx(2 / 3, abs=1e-4)
    assert (recent.charts("B1")["error_rate"][-1], recent.charts("B2")["error_rate"][-1]) == (0.0, 1.0)


def test_a_server_that_is_forgotten_loses_its_buckets_and_the_fleet_keeps_them(recent):
    recent.record("B1", 200, 0.02)
    recent.forget("B1")
    recent.forget("never-seen")
    assert recent.charts("B1")["rps"][-1] == 0.0
    assert recent.charts(FLEET)["rps"][-1] == 0.1


def test_past_the_limit_of_series_a_new_server_is_counted_only_in_the_fleet(recent, monkeypatch):
    monkeypatch.setattr(history, "MAX_SERIES", 2)
    for server in ("B1", "B2", "B3"):
        recent.record(server, 200, 0.02)
    assert [recent.charts(server)["rps"][-1] for server in ("B1", "B2", "B3")] == [0.1, 0.1, 0.0]
    assert recent.charts(FLEET)["rps"][-1] == 0.3


def test_recording_does_not_grow_memory(recent, clock):
    for server in ("B1", "B2"):
        recent.record(server, 200, 0.02)
    # Only what history.py allocates counts: a daemon thread left by another test (a Redis
    # follower retrying, say) allocates too, and that is no concern of this test's.
    only_history = [tracemalloc.Filter(True, history.__file__)]
    tracemalloc.start()
    try:
        before = tracemalloc.take_snapshot().filter_traces(only_history)
        for n in range(20_000):
            clock.now += 0.1  # through every bucket twice over: each slot is reused in place
            recent.record("B1" if n % 2 else "B2", 200 + n % 400, n % 1000 / 100)
        after = tracemalloc.take_snapshot().filter_traces(only_history)
    finally:
        tracemalloc.stop()
    grown = sum(stat.size_diff for stat in after.compare_to(before, "filename"))
    assert grown < 1024  # nothing kept per request: fixed arrays, reused


def test_the_metrics_feed_the_history_and_drop_a_server_that_leaves():
    metrics = GatewayMetrics()
    metrics.request_done("B1", "GET", 200, 0.02)
    metrics.request_done("B1", "POST", 502, 0.02)
    assert metrics.history.charts("B1")["error_rate"][-1] == 0.5
    metrics.server_removed("B1")
    assert metrics.history.charts("B1")["rps"][-1] == 0.0
    assert metrics.history.charts(FLEET)["rps"][-1] > 0
