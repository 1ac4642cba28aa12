"""Reading a monitor's report: parsing, fit under the threshold, load score, summary."""

import pytest

from gateway.fleet.resources import DEFAULT_WEIGHTS, GIB, parse_reading, parse_weights


def report(gpus=((24, 4), (80, 70)), device="gpu", cpu=10.0, memory=(64, 48, 25.0), disk=50.0, thresholds=None):
    """A /resources document; gpus are (total GiB, used GiB)."""
    document = {
        "device_type": device,
        "cpu": {"count": 8, "percent": cpu, "load_avg": [0.1, 0.2, 0.3]},
        "memory": {"total": memory[0] * GIB, "available": memory[1] * GIB, "used": 0, "percent": memory[2]},
        "disk": {"total": 1, "used": 1, "free": 0, "percent": disk},
        "gpus": [
            {"index": i, "memory_total": t * GIB, "memory_used": u * GIB, "memory_free": (t - u) * GIB}
            for i, (t, u) in enumerate(gpus)
        ],
    }
    if thresholds:
        document["thresholds"] = thresholds
    return document


def test_usable_memory_is_the_best_gpu_under_the_threshold():
    reading = parse_reading(report(), received=0.0)
    # GPU 0: 24 * 0.9 - 4 = 17.6 GiB; GPU 1: 80 * 0.9 - 70 = 2 GiB.
    assert reading.usable_bytes() == int(24 * GIB * 0.9) - 4 * GIB
    assert reading.fits(17 * GIB)
    assert not reading.fits(18 * GIB)


def test_threshold_comes_from_the_monitor():
    reading = parse_reading(report(thresholds={"gpu_memory_percent": 50}), received=0.0)
    assert reading.usable_bytes() == 8 * GIB


def test_a_full_gpu_has_nothing_usable():
    reading = parse_reading(report(gpus=((24, 24),)), received=0.0)
    assert reading.usable_bytes() == 0
    assert not reading.fits(1)


def test_cpu_host_uses_ram():
    reading = parse_reading(report(gpus=(), device="cpu", memory=(64, 48, 25.0)), received=0.0)
    assert reading.usable_bytes() == int(64 * GIB * 0.9) - 16 * GIB


def test_gpu_mode_without_gpus_fits_nothing():
    reading = parse_reading(report(gpus=()), received=0.0)
    assert not reading.fits(1)


def test_load_score_is_the_seed_formula():
    reading = parse_reading(report(gpus=((100, 40),), cpu=20.0, memory=(64, 48, 30.0), disk=50.0), received=0.0)
    assert reading.load_score(DEFAULT_WEIGHTS) == pytest.approx(0.3 * 20 + 0.3 * 30 + 0.3 * 40 + 0.1 * 50)
    assert reading.load_score({"gpu": 1.0}) == pytest.approx(40.0)


def test_summary_marks_stale_readings():
    reading = parse_reading(report(), received=100.0)
    fresh, stale = reading.summary(now=150.0, stale_after=90.0), reading.summary(now=200.0, stale_after=90.0)
    assert (fresh["stale"], stale["stale"]) == (False, True)
    assert fresh["gpu_memory_total"] == 104 * GIB
    assert fresh["gpu_memory_free"] == 30 * GIB
    assert fresh["age_s"] == 50.0


def test_null_gpu_fields_count_as_zero():
    document = report()
    document["gpus"][0]["memory_used"] = None
    assert parse_reading(document, received=0.0).gpus[0].memory_used == 0


@pytest.mark.parametrize(
    "damage",
    [
        lambda d: d.pop("cpu"),
        lambda d: d["memory"].update(percent=150),
        lambda d: d["gpus"][0].update(memory_total=-1),
        lambda d: d["gpus"][0].pop("memory_free"),
        lambda d: d.update(gpus="many"),
        lambda d: d["disk"].update(percent="lots"),
    ],
)
def test_malformed_reports_are_refused(damage):
    document = report()
    damage(document)
    with pytest.raises(ValueError):
        parse_reading(document, received=0.0)


def test_weights_parse():
    assert parse_weights("cpu=0.5, gpu=0.5") == {"cpu": 0.5, "gpu": 0.5}


@pytest.mark.parametrize("raw", ["cpu", "net=0.3", "cpu=x", "cpu=-1", "cpu=inf"])
def test_bad_weights_are_refused(raw):
    with pytest.raises(ValueError):
        parse_weights(raw)
