"""LLM requests placed by their model's memory need and where it is loaded: a real gateway, fake boxes and monitors."""

from __future__ import annotations

import pytest
import requests
from conftest import SECRET
from fake_monitor import gpu_report

MODEL = "qwen3:14b"
ADMIN = {"X-Webhook-Secret": SECRET}


@pytest.fixture
def boxes(live_gateway, fake_llm_servers, fake_monitors):
    """Start a gateway and register fake Ollama boxes, each ((total GiB, used GiB) or None, loaded models, options)."""

    def start(gateway_options: dict, **servers: tuple) -> object:
        gateway = live_gateway(health_check_interval=3600.0, health_check_timeout=2.0, **gateway_options)
        for server_id, (gpu, loaded, options) in servers.items():
            box = fake_llm_servers(server_id, models=[MODEL, "llama3:8b"], loaded=loaded, vram={MODEL: 9 * 2**30})
            body = {"server_id": server_id, "ip": "127.0.0.1", "port": box.port, "secret": SECRET, **options}
            body["models"] = box.models
            if gpu is not None:
                body["monitor_url"] = fake_monitors(gpu_report(*gpu)).url
            requests.post(gateway.url + "/webhook/register", json=body, timeout=5).raise_for_status()
        gateway.manager.run_health_sweep()  # reads the monitors and each box's /api/ps
        return gateway

    return start


def chat(gateway, count: int, model: str = MODEL, headers: dict | None = None) -> list[str]:
    """Who answered each of `count` chat completions (or the status of a refusal)."""
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
    answers = [
        requests.post(gateway.url + "/v1/chat/completions", json=body, headers=headers or {}, timeout=5)
        for _ in range(count)
    ]
    return [answer.headers.get("X-Backend-Server", str(answer.status_code)) for answer in answers]


SMALL, BIG = (24, 20), (80, 10)  # 1.6 GiB and 62 GiB usable under the 90% threshold


def test_a_models_need_from_model_memory_gb_sends_it_only_where_it_fits(boxes):
    gateway = boxes({"model_memory_gb": {MODEL: 24}}, B1=(SMALL, [], {}), B2=(BIG, [], {}))

    assert chat(gateway, 4) == ["B2"] * 4
    assert sorted(chat(gateway, 4, model="llama3:8b")) == ["B1", "B1", "B2", "B2"]  # no need declared for it
    assert sorted(chat(gateway, 2, headers={"X-Required-GPU-Memory-GB": "1"})) == ["B1", "B2"]  # the header wins


def test_a_servers_own_need_wins_and_a_need_that_fits_nowhere_is_a_503(boxes):
    gateway = boxes(
        {}, B1=(SMALL, [], {"model_memory_gb": {MODEL: 30}}), B2=(BIG, [], {"model_memory_gb": {MODEL: 70}})
    )

    assert chat(gateway, 1) == ["503"]
    body = {"model": MODEL, "messages": []}
    refused = requests.post(gateway.url + "/v1/chat/completions", json=body, timeout=5).json()
    assert refused["error"]["code"] == "no_fit"
    assert "30 GB" in refused["error"]["message"]  # the smallest need that did not fit


def test_a_box_with_the_model_loaded_is_preferred_though_its_gpu_is_full(boxes):
    gateway = boxes({"model_memory_gb": {MODEL: 24}}, B1=((24, 24), [MODEL], {}), B2=(BIG, [], {}), B3=(BIG, [], {}))

    assert chat(gateway, 3) == ["B1"] * 3
    listed = requests.get(gateway.url + "/admin/servers", headers=ADMIN, timeout=5).json()["data"]["servers"]
    loaded = {server["server_id"]: server["loaded_models"] for server in listed}
    assert [(m["name"], m["size_vram"]) for m in loaded["B1"]] == [(MODEL, 9 * 2**30)]
    assert loaded["B2"] == loaded["B3"] == []


def test_skip_resource_check_takes_the_model_whatever_its_reading(boxes):
    gateway = boxes(
        {"model_memory_gb": {MODEL: 24}},
        B1=((24, 24), [], {"skip_resource_check": True}),
        B2=(BIG, [], {}),
        B3=(SMALL, [], {}),
    )

    assert sorted(chat(gateway, 4)) == ["B1", "B1", "B2", "B2"]
