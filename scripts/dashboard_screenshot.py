"""Take the README's dashboard screenshot (docs/dashboard.png) from a real gateway and headless chromium.

The charts need 15 minutes of traffic, which a screenshot cannot wait for: the script counts a
made-up 15 minutes through the metrics' own request_done (the proxy's path into the ring buffer),
on a clock set back 15 minutes, then sends real requests through the gateway. The job queue is
real too: jobs submitted over HTTP (the oldest on the job store's clock set back a few minutes),
some run by the fake servers, one failed by a 500, a backlog for a model that only a pull worker
serves, and that worker leasing two of them; a second worker last called ten minutes ago. Nine
allocation keys are pinned over the four servers.

Run it from the repository root:  .venv/bin/python scripts/dashboard_screenshot.py
It needs selenium (requirements-dev.txt) and Debian's chromium and chromium-driver.
"""

from __future__ import annotations

import math
import secrets
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import requests
from werkzeug.serving import make_server

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

from demo.fake_gpu_server import FakeGPUServer  # noqa: E402
from gateway.app import create_app  # noqa: E402
from gateway.config import Config  # noqa: E402
from gateway.fleet.resources import parse_reading  # noqa: E402

GIB = 2**30
OUTPUT = ROOT / "docs" / "dashboard.png"
FLEET = {"gpu-a": (80, 22), "gpu-b": (80, 61), "gpu-c": (24, 9), "gpu-d": (48, 40)}  # total, used GiB
OPTIONS = {
    "gpu-a": {"models": ["llama3.1:70b"], "max_concurrent": 8, "max_allocations": 6},
    "gpu-b": {"models": ["llama3.1:70b", "qwen2.5:32b"], "max_concurrent": 8, "weight": 2, "max_allocations": 12},
    "gpu-c": {"models": ["llama3.1:8b"], "max_concurrent": 4},
    "gpu-d": {"models": ["qwen2.5:32b"], "priority": 2},
}
MONITOR_URL = "http://127.0.0.1:9/resources"  # never answers: readings are handed in below
PULLED_MODEL = "llama3.1:405b"  # no registered server has it: its jobs wait for the pull worker
BACKLOG = [0, 2, 2, 5, 5, 5, 5, 5, 7, 9]  # the priorities of the jobs queued for it


def reading(total_gib: int, used_gib: int) -> object:
    """A gpu monitor's reading of one card, as if just received."""
    gpu = {"index": 0, "memory_total": total_gib * GIB, "memory_used": used_gib * GIB,
           "memory_free": (total_gib - used_gib) * GIB}  # fmt: skip
    document = {"device_type": "gpu", "cpu": {"percent": 12}, "disk": {"percent": 40},
                "memory": {"total": 64 * GIB, "available": 40 * GIB, "percent": 37}, "gpus": [gpu]}  # fmt: skip
    return parse_reading(document, time.monotonic())


def replay_traffic(metrics: object, minutes: int = 15) -> None:
    """Count `minutes` of made-up requests into the metrics, on a clock that runs from then to now."""
    history = metrics.history  # type: ignore[attr-defined]
    real_clock, offset = history.clock, [-60.0 * minutes]
    history.clock = lambda: real_clock() + offset[0]
    try:
        for step in range(minutes * 6):  # one 10 s bucket at a time
            offset[0] = -60.0 * minutes + 10 * step
            wave = 1 + math.sin(step / 9)
            for n, server_id in enumerate(FLEET):
                if server_id == "gpu-d" and step > minutes * 6 - 20:
                    continue  # it died three minutes ago
                count = int(12 + 10 * n + 25 * wave) if server_id != "gpu-c" else int(6 + 4 * wave)
                failing = server_id == "gpu-d" and step > minutes * 6 - 30  # failing before it died
                for i in range(count):
                    seconds = 0.04 * (1 + n) * (1 + (i % 20 == 0) * 6 * wave)  # every 20th is slow
                    status = 502 if failing and i % 3 == 0 else 200
                    metrics.request_done(server_id, "POST", status, seconds)  # type: ignore[attr-defined]
    finally:
        history.clock = real_clock


def worker_call(url: str, secret: str, worker_id: str, **ask: object) -> int:
    """One lease as a pull worker does it, with the webhook secret as its Bearer token; how many jobs came."""
    body = {"worker_id": worker_id, **ask}
    answer = requests.post(url + "/workers/lease", json=body, headers={"Authorization": f"Bearer {secret}"}, timeout=5)
    answer.raise_for_status()
    return len(answer.json()["jobs"]) if answer.status_code == 200 else 0


def queue_jobs(app: object, url: str, secret: str) -> None:
    """Fill the job queue over HTTP: done jobs, a dead letter, a backlog, and workers to see it."""
    service = app.extensions["jobs"]  # type: ignore[attr-defined]
    registry, store = service.workers, service.store
    real_registry_clock, real_store_clock = registry.clock, store.clock
    registry.clock = lambda: real_registry_clock() - 600  # a home GPU that last called ten minutes ago
    worker_call(url, secret, "home-rtx-4090", routes=["/api/"])
    registry.clock = real_registry_clock
    asynchronous = {"Prefer": "respond-async"}
    for _ in range(6):
        requests.post(url + "/api/enhance", json={"image": "..."}, headers=asynchronous, timeout=5)
    requests.post(url + "/api/status-code?code=500", headers=asynchronous, timeout=5)  # a POST: failed at once
    chat = {"model": PULLED_MODEL, "messages": [{"role": "user", "content": "Summarise this contract."}]}
    try:
        for n, priority in enumerate(BACKLOG):
            store.clock = lambda n=n: real_store_clock() - 400 + 30 * n  # queued over the last few minutes
            headers = {**asynchronous, "X-Job-Priority": str(priority)}
            requests.post(url + "/v1/chat/completions", json=chat, headers=headers, timeout=5).raise_for_status()
    finally:
        store.clock = real_store_clock
    worker_call(url, secret, "nat-gpu-7", models=[PULLED_MODEL], max_jobs=2)
    deadline = time.monotonic() + 15
    while store.counts().by_status["succeeded"] < 6 and time.monotonic() < deadline:
        time.sleep(0.1)  # the fake servers run the /api/ jobs


def main() -> None:
    workdir = Path(tempfile.mkdtemp(prefix="dashboard-shot-"))
    secret = secrets.token_urlsafe(24)
    config = Config.from_env(
        {"WEBHOOK_SECRET": secret},
        backend_servers_file=str(workdir / "backend_servers.json"),
        task_affinity_file=str(workdir / "task_affinity.db"),
        job_store_file=str(workdir / "jobs.db"),
        allocation_store_file=str(workdir / "allocations.db"),
        health_check_interval=3600.0,
        health_check_timeout=1.0,
    )
    app = create_app(config)
    manager = app.extensions["backend_manager"]
    gateway = make_server("127.0.0.1", 0, app, threaded=True)
    url = f"http://127.0.0.1:{gateway.server_port}"
    servers = [FakeGPUServer(server_id).start() for server_id in FLEET]
    driver = None
    try:
        threading.Thread(target=gateway.serve_forever, daemon=True).start()
        for server in servers:
            options = OPTIONS[server.server_id]
            manager.register_server(server.server_id, "127.0.0.1", server.port, MONITOR_URL, options=options)
        for n in range(9):  # conversations pinned by allocation, before gpu-d goes down and gpu-c drains
            app.extensions["allocations"].allocate(f"conv-{n}")
        servers[3].stop()
        replay_traffic(app.extensions["metrics"])
        for _ in range(40):
            requests.get(url + "/api/echo", timeout=5)
        for _ in range(3):
            manager.run_health_sweep()
        manager.set_draining("gpu-c", True)
        queue_jobs(app, url, secret)
        manager.apply_readings([(s.server_id, MONITOR_URL, reading(*FLEET[s.server_id])) for s in servers])

        options = webdriver.ChromeOptions()
        options.binary_location = shutil.which("chromium") or "/usr/bin/chromium"
        for argument in (
            "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            f"--user-data-dir={workdir / 'chromium'}", "--window-size=1200,900",
        ):  # fmt: skip
            options.add_argument(argument)
        driver = webdriver.Chrome(options=options, service=Service(shutil.which("chromedriver")))
        metrics = {"width": 1200, "height": 860, "deviceScaleFactor": 1, "mobile": False}
        driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", metrics)  # the page, not the window
        driver.get(url + "/dashboard")
        driver.find_element(By.NAME, "secret").send_keys(secret)
        driver.find_element(By.CSS_SELECTOR, "form.login button").click()
        WebDriverWait(driver, 15).until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#servers td.health")) == 4)
        WebDriverWait(driver, 15).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#charts .chart.p95_s path[d^=M]"))
        WebDriverWait(driver, 15).until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#workers td.state")) == 2)
        height = driver.execute_script("return document.documentElement.scrollHeight")
        driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {**metrics, "height": height})  # the whole page
        time.sleep(1.5)  # let "since" tick past zero
        OUTPUT.parent.mkdir(exist_ok=True)
        driver.save_screenshot(str(OUTPUT))
        print(f"{OUTPUT.relative_to(ROOT)}: {OUTPUT.stat().st_size} bytes")
    finally:
        if driver is not None:
            driver.quit()
        for server in servers[:3]:
            server.stop()
        gateway.shutdown()
        gateway.server_close()
        app.extensions["gateway_shutdown"]()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
