"""The resource monitor: /health, /resources and /check over a fake NVML, with real psutil readings."""

from __future__ import annotations

import importlib.util
import itertools
import math
import socket
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from types import ModuleType
from typing import Any

import psutil
import pytest
from click.testing import CliRunner
from flask import Flask

from resource_monitor.__main__ import main
from resource_monitor.app import close_app, create_app
from resource_monitor.gpu import GPUReader
from resource_monitor.monitor import Monitor
from resource_monitor.settings import Settings, SettingsError

FAKE_NVML = Path(__file__).resolve().parent.parent / "fakes" / "pynvml.py"
GIB = 1024**3
_loaded = itertools.count()


@pytest.fixture
def fake_nvml(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """A fresh copy of tests/fakes/pynvml.py: its GPUs and counters belong to this test alone."""
    monkeypatch.delenv("FAKE_NVML_FAIL_INIT", raising=False)
    monkeypatch.delenv("FAKE_NVML_GPUS", raising=False)
    name = f"fake_pynvml_{next(_loaded)}"
    spec = importlib.util.spec_from_file_location(name, FAKE_NVML)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, name, module)  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def make_monitor(fake_nvml: ModuleType) -> Iterator[Callable[..., Flask]]:
    """Build monitor apps (gpu mode over the fake NVML unless told otherwise); NVML is shut down after."""
    apps: list[Flask] = []

    def build(device_type: str = "gpu", nvml: ModuleType | None = fake_nvml, **settings: Any) -> Flask:
        app = create_app(Settings(device_type=device_type, **settings), nvml=nvml)
        app.config["TESTING"] = True
        apps.append(app)
        return app

    yield build
    for app in apps:
        close_app(app)


def get_json(app: Flask, path: str) -> tuple[int, Any]:
    response = app.test_client().get(path)
    return response.status_code, response.get_json()


# -- /resources ------------------------------------------------------------------------------


def test_resources_reports_the_fake_gpus(make_monitor):
    status, body = get_json(make_monitor(), "/resources")
    assert status == 200
    assert body["device_type"] == "gpu"
    assert "error" not in body
    assert body["gpus"] == [
        {
            "index": 0,
            "name": "NVIDIA Fake A100",
            "uuid": "GPU-00000000-fake-0000-0000-000000000000",
            "memory_total": 24 * GIB,
            "memory_used": 4 * GIB,
            "memory_free": 20 * GIB,
            "utilization": 35,
            "temperature": 51,
        },
        {
            "index": 1,
            "name": "NVIDIA Fake T4",
            "uuid": "GPU-11111111-fake-1111-1111-111111111111",
            "memory_total": 16 * GIB,
            "memory_used": 12 * GIB,
            "memory_free": 4 * GIB,
            "utilization": 80,
            "temperature": None,  # Not Supported on this one
        },
    ]
    assert body["thresholds"] == {"memory_percent": 90, "gpu_memory_percent": 90}


def test_resources_host_readings_are_psutils(make_monitor):
    status, body = get_json(make_monitor(), "/resources")
    assert status == 200
    assert body["hostname"] == socket.gethostname()
    taken = datetime.fromisoformat(body["timestamp"])
    assert taken.utcoffset() is not None and taken.utcoffset().total_seconds() == 0
    assert abs((datetime.now(UTC) - taken).total_seconds()) < 60

    cpu, memory, disk = body["cpu"], body["memory"], body["disk"]
    assert cpu["count"] == psutil.cpu_count()
    assert 0 <= cpu["percent"] <= 100
    assert len(cpu["load_avg"]) == 3 and all(load >= 0 for load in cpu["load_avg"])

    assert memory["total"] == psutil.virtual_memory().total
    assert 0 < memory["available"] <= memory["total"]
    assert 0 < memory["used"] <= memory["total"]
    assert 0 <= memory["percent"] <= 100

    assert disk["total"] == psutil.disk_usage("/").total
    assert disk["used"] + disk["free"] <= disk["total"]
    assert 0 <= disk["percent"] <= 100


def test_cpu_mode_reports_no_gpus_and_never_touches_nvml(make_monitor, fake_nvml):
    app = make_monitor("cpu")
    status, body = get_json(app, "/resources")
    assert (status, body["device_type"], body["gpus"]) == (200, "cpu", [])
    assert "error" not in body
    assert get_json(app, "/health") == (200, {"status": "ok", "device_type": "cpu"})
    assert sum(fake_nvml.calls.values()) == 0


@pytest.mark.parametrize(
    ("field", "nulls"),
    [
        ("name", ["name"]),
        ("uuid", ["uuid"]),
        ("memory", ["memory_total", "memory_used", "memory_free"]),
        ("utilization", ["utilization"]),
        ("temperature", ["temperature"]),
    ],
)
def test_a_field_the_gpu_does_not_support_is_null(make_monitor, fake_nvml, field, nulls):
    fake_nvml.GPUS[0].unsupported = frozenset({field})
    status, body = get_json(make_monitor(), "/resources")
    assert status == 200
    gpu = body["gpus"][0]
    assert {key for key, value in gpu.items() if value is None} == set(nulls)
    assert get_json(make_monitor(), "/health")[0] == 200


def test_a_gpu_that_cannot_be_opened_is_listed_with_its_index_only(make_monitor, fake_nvml, monkeypatch):
    real_handle = fake_nvml.nvmlDeviceGetHandleByIndex

    def handle(index):
        if index == 1:
            raise fake_nvml.NVMLError_GpuIsLost()
        return real_handle(index)

    monkeypatch.setattr(fake_nvml, "nvmlDeviceGetHandleByIndex", handle)
    _, body = get_json(make_monitor(), "/resources")
    assert body["gpus"][0]["memory_total"] == 24 * GIB
    assert body["gpus"][1] == {
        "index": 1,
        **dict.fromkeys(["name", "uuid", "memory_total", "memory_used", "memory_free", "utilization", "temperature"]),
    }


# -- NVML failures ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("error", "text"),
    [
        ("NVMLError_LibraryNotFound", "NVML Shared Library Not Found"),
        ("NVMLError_DriverNotLoaded", "Driver Not Loaded"),
    ],
)
def test_without_nvml_the_monitor_starts_and_says_why(make_monitor, fake_nvml, error, text):
    fake_nvml.FAIL_INIT = True
    fake_nvml.INIT_ERROR = getattr(fake_nvml, error)
    app = make_monitor()

    assert get_json(app, "/health") == (503, {"status": "error", "device_type": "gpu", "error": text})
    status, body = get_json(app, "/resources")
    assert (status, body["gpus"], body["error"]) == (200, [], text)
    assert body["memory"]["total"] == psutil.virtual_memory().total  # the rest of the reading still works
    status, body = get_json(app, "/check?required_gb=1")
    assert status == 200
    assert body["fits"] is False
    assert (body["gpu_index"], body["usable_bytes"], body["error"]) == (None, 0, text)


def test_fake_nvml_fails_at_init_from_the_environment(monkeypatch, make_monitor, fake_nvml):
    monkeypatch.setenv("FAKE_NVML_FAIL_INIT", "1")
    spec = importlib.util.spec_from_file_location("fake_pynvml_env", FAKE_NVML)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "fake_pynvml_env", module)
    spec.loader.exec_module(module)
    assert get_json(make_monitor(nvml=module), "/health")[0] == 503


def test_a_driver_that_loads_later_is_picked_up(make_monitor, fake_nvml):
    fake_nvml.FAIL_INIT = True
    app = make_monitor(cache_expire_time=0)
    assert get_json(app, "/health")[0] == 503
    fake_nvml.FAIL_INIT = False
    assert get_json(app, "/health") == (200, {"status": "ok", "device_type": "gpu"})
    assert len(get_json(app, "/resources")[1]["gpus"]) == 2


def test_listing_the_gpus_failing_is_an_error_not_a_crash(make_monitor, fake_nvml, monkeypatch):
    def lost():
        raise fake_nvml.NVMLError_Unknown()

    app = make_monitor()
    monkeypatch.setattr(fake_nvml, "nvmlDeviceGetCount", lost)
    assert get_json(app, "/health") == (503, {"status": "error", "device_type": "gpu", "error": "Unknown Error"})
    _, body = get_json(app, "/resources")
    assert (body["gpus"], body["error"]) == ([], "Unknown Error")


def test_a_gpu_host_without_gpus_is_not_healthy(make_monitor, fake_nvml):
    fake_nvml.GPUS.clear()
    assert get_json(make_monitor(), "/health")[0] == 503
    _, body = get_json(make_monitor(), "/check?required_gb=1")
    assert body["fits"] is False and body["error"] == "NVML reports no GPUs"


def test_nvml_is_initialised_once_and_shut_down_once(make_monitor, fake_nvml):
    app = make_monitor(cache_expire_time=0)
    for _ in range(3):
        get_json(app, "/resources")
    assert fake_nvml.calls["nvmlInit"] == 1
    close_app(app)
    close_app(app)
    assert fake_nvml.calls["nvmlShutdown"] == 1
    assert fake_nvml._initialised == 0
    assert get_json(app, "/health")[1]["error"] == "NVML is shut down"  # not opened again after close
    assert fake_nvml.calls["nvmlInit"] == 1


def test_the_real_pynvml_path(make_monitor):
    """nvidia-ml-py itself: without a driver (as here) the monitor still starts and says why."""
    app = make_monitor(nvml=None)
    reader = app.extensions["resource_monitor"].gpu_reader
    assert reader.nvml.__name__ == "pynvml" and hasattr(reader.nvml, "nvmlDeviceGetMemoryInfo")
    assert not reader.nvml.__file__.startswith(str(FAKE_NVML.parent))
    status, body = get_json(app, "/health")
    _, reading = get_json(app, "/resources")
    if reader.init_error is None:  # a machine with a working NVIDIA driver
        assert status == 200 and reading["gpus"] and reading["gpus"][0]["memory_total"] > 0
    else:
        assert status == 503
        assert body["error"] == reader.init_error != ""
        assert (reading["gpus"], reading["error"]) == ([], reader.init_error)


# -- /check ----------------------------------------------------------------------------------


def test_check_picks_the_gpu_with_the_most_usable_memory(make_monitor):
    status, body = get_json(make_monitor(), "/check?required_gb=10")
    assert status == 200
    usable = int(24 * GIB * 0.9) - 4 * GIB
    assert body == {
        "fits": True,
        "required_bytes": 10 * GIB,
        "device_type": "gpu",
        "gpu_index": 0,
        "usable_bytes": usable,
        "free_bytes": 20 * GIB,
        "threshold_percent": 90,
    }
    assert get_json(make_monitor(), "/check?required_gb=18")[1]["fits"] is False


def test_usable_memory_not_free_memory_decides(make_monitor, fake_nvml):
    """80 GiB with 60 used has more free (20) but less usable (72 - 60 = 12) than 16 GiB idle (14.4)."""
    fake_nvml.GPUS[:] = [
        fake_nvml.FakeGPU("big", "GPU-big", 80 * GIB, 60 * GIB),
        fake_nvml.FakeGPU("small", "GPU-small", 16 * GIB, 0),
    ]
    _, body = get_json(make_monitor(), "/check?required_gb=13")
    assert (body["fits"], body["gpu_index"], body["free_bytes"]) == (True, 1, 16 * GIB)


def test_a_gpu_without_memory_readings_is_never_picked(make_monitor, fake_nvml):
    fake_nvml.GPUS[0].unsupported = frozenset({"memory"})
    _, body = get_json(make_monitor(), "/check?required_gb=1")
    assert (body["fits"], body["gpu_index"]) == (True, 1)


@pytest.mark.parametrize(
    ("required_gb", "fits"),
    [("6", True), (repr(6 + 2**-30), False), ("5.5", True), ("7", False)],  # 6 GiB exactly, then one byte more
)
def test_check_at_the_boundary(make_monitor, fake_nvml, required_gb, fits):
    fake_nvml.GPUS[:] = [fake_nvml.FakeGPU("g", "GPU-g", 20 * GIB, 4 * GIB)]  # 50% of 20 GiB, less 4: 6 GiB
    _, body = get_json(make_monitor(gpu_memory_threshold=50), f"/check?required_gb={required_gb}")
    assert body["usable_bytes"] == 6 * GIB
    assert body["required_bytes"] == math.ceil(float(required_gb) * GIB)
    assert body["fits"] is fits


def test_check_on_a_cpu_host_uses_ram(make_monitor):
    app = make_monitor("cpu", memory_threshold=95, cache_expire_time=60)  # one reading for the whole test
    memory = get_json(app, "/resources")[1]["memory"]
    usable = max(0, int(memory["total"] * 0.95) - (memory["total"] - memory["available"]))
    assert usable > 0

    _, body = get_json(app, f"/check?required_gb={usable / GIB!r}")
    assert body == {
        "fits": True,
        "required_bytes": usable,
        "device_type": "cpu",
        "gpu_index": None,
        "usable_bytes": usable,
        "free_bytes": memory["available"],
        "threshold_percent": 95,
    }
    assert get_json(app, f"/check?required_gb={(usable + 1) / GIB!r}")[1]["fits"] is False


@pytest.mark.parametrize(
    "query", ["", "?required_gb=", "?other=1"] + [f"?required_gb={v}" for v in ("0", "-1", "abc", "nan", "inf", "-inf")]
)
def test_check_needs_a_positive_number(make_monitor, query):
    status, body = get_json(make_monitor(), "/check" + query)
    assert status == 400
    assert body["success"] is False
    assert "required_gb" in body["message"]
    assert list(body["errors"]) == ["required_gb"]


def test_errors_have_the_projects_shape(make_monitor):
    status, body = get_json(make_monitor(), "/nowhere")
    assert status == 404 and body["success"] is False and body["message"] and body["errors"] is None
    response = make_monitor().test_client().post("/resources")
    assert response.status_code == 405 and response.get_json()["success"] is False


# -- the cache -------------------------------------------------------------------------------


def test_a_burst_of_polls_costs_one_read(make_monitor, fake_nvml):
    app = make_monitor(cache_expire_time=60)
    client = app.test_client()
    for path in ["/resources", "/health", "/check?required_gb=1"] * 6 + ["/resources"] * 2:
        assert client.get(path).status_code == 200
    assert fake_nvml.calls["nvmlDeviceGetCount"] == 1
    assert fake_nvml.calls["nvmlDeviceGetMemoryInfo"] == 2  # one per GPU


def test_concurrent_polls_share_one_read(make_monitor, fake_nvml):
    app = make_monitor(cache_expire_time=60)
    with ThreadPoolExecutor(max_workers=20) as pool:
        statuses = list(pool.map(lambda _: app.test_client().get("/resources").status_code, range(20)))
    assert statuses == [200] * 20
    assert fake_nvml.calls["nvmlDeviceGetCount"] == 1


def test_a_reading_expires_after_the_cache_time(fake_nvml):
    now = [100.0]
    reader = GPUReader(fake_nvml)
    monitor = Monitor(Settings(device_type="gpu", cache_expire_time=2), reader, clock=lambda: now[0])
    first = monitor.reading()
    now[0] += 1.9
    assert monitor.reading() is first
    now[0] += 0.1
    assert monitor.reading() is not first
    assert fake_nvml.calls["nvmlDeviceGetCount"] == 2
    reader.close()


# -- settings --------------------------------------------------------------------------------


def test_settings_defaults():
    settings = Settings.from_env({})
    assert settings == Settings(
        device_type="cpu", memory_threshold=90, gpu_memory_threshold=90, cache_expire_time=2, disk_path="/"
    )


def test_settings_from_the_environment(tmp_path):
    env = {
        "MONITOR_MEMORY_THRESHOLD": "80",
        "MONITOR_GPU_MEMORY_THRESHOLD": "95.5",
        "MONITOR_CACHE_EXPIRE_TIME": "0",
        "MONITOR_DISK_PATH": str(tmp_path),
    }
    settings = Settings.from_env(env, device_type="gpu")
    assert settings == Settings("gpu", 80, 95.5, 0, str(tmp_path))


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("MONITOR_MEMORY_THRESHOLD", "abc"),
        ("MONITOR_MEMORY_THRESHOLD", "0"),
        ("MONITOR_MEMORY_THRESHOLD", "101"),
        ("MONITOR_MEMORY_THRESHOLD", "nan"),
        ("MONITOR_GPU_MEMORY_THRESHOLD", "-5"),
        ("MONITOR_GPU_MEMORY_THRESHOLD", "inf"),
        ("MONITOR_GPU_MEMORY_THRESHOLD", "90%"),
        ("MONITOR_CACHE_EXPIRE_TIME", "-1"),
        ("MONITOR_CACHE_EXPIRE_TIME", "soon"),
        ("MONITOR_CACHE_EXPIRE_TIME", "86400"),
        ("MONITOR_DISK_PATH", "/no/such/directory"),
    ],
)
def test_a_bad_setting_names_its_variable(name, value):
    with pytest.raises(SettingsError, match=name):
        Settings.from_env({name: value})


def test_the_command_line_refuses_a_bad_setting_with_exit_status_2():
    result = CliRunner().invoke(main, ["--device", "cpu"], env={"MONITOR_MEMORY_THRESHOLD": "200"})
    assert result.exit_code == 2
    assert "MONITOR_MEMORY_THRESHOLD" in result.output


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        ([], {}, "--device"),
        (["--device", "tpu"], {}, "--device"),
        (["--device", "gpu", "--port", "70000"], {}, "--port"),
        (["--device", "gpu"], {"MONITOR_PORT": "x"}, "MONITOR_PORT"),
    ],
)
def test_the_command_line_refuses_bad_options(args, env, message):
    result = CliRunner().invoke(main, args, env=env)
    assert result.exit_code == 2
    assert message in result.output
