"""LLM requests as jobs: routed by model when a box with it comes, the model renamed as the box names it."""

from __future__ import annotations

import requests
from conftest import SECRET, wait_until

CHAT = {"model": "llama3.1", "messages": [{"role": "user", "content": "Hi"}]}


def register(gateway, box, models, model_map=None) -> None:
    body = {"server_id": box.server_id, "ip": "127.0.0.1", "port": box.port, "secret": SECRET, "models": models}
    if model_map:
        body["model_map"] = model_map
    requests.post(gateway.url + "/webhook/register", json=body, timeout=5).raise_for_status()


def result_of(gateway, job_id: str) -> requests.Response:
    assert wait_until(lambda: requests.get(f"{gateway.url}/jobs/{job_id}/result", timeout=5).status_code != 202, 15)
    return requests.get(f"{gateway.url}/jobs/{job_id}/result", timeout=5)


def test_an_openai_request_waits_for_a_box_with_its_model_and_is_renamed_for_it(live_gateway, fake_llm_servers):
    gateway = live_gateway()
    accepted = requests.post(
        gateway.url + "/v1/chat/completions", json=CHAT, headers={"Prefer": "respond-async"}, timeout=5
    )
    assert accepted.status_code == 202
    job = requests.get(f"{gateway.url}/jobs/{accepted.json()['job_id']}", timeout=5).json()
    assert job["task_type"] == "llama3.1"
    other = fake_llm_servers("B1", models=["qwen2:7b"])
    register(gateway, other, ["qwen2:7b"])  # a box without the model: the job keeps waiting
    box = fake_llm_servers("B2", models=["llama3.1:8b-instruct-q4_K_M"])
    register(gateway, box, ["llama3.1:8b-instruct-q4_K_M"], {"llama3.1": "llama3.1:8b-instruct-q4_K_M"})
    result = result_of(gateway, accepted.json()["job_id"])
    assert result.status_code == 200
    assert result.headers["X-Backend-Server"] == "B2"
    assert result.json()["model"] == "llama3.1:8b-instruct-q4_K_M"  # the box got its own name for it


def test_a_streamed_request_with_a_key_is_answered_whole(live_gateway, fake_llm_servers):
    gateway = live_gateway()
    box = fake_llm_servers("B1", models=["llama3:8b"])
    register(gateway, box, ["llama3:8b"])
    body = {"model": "llama3:8b", "messages": [{"role": "user", "content": "Hi"}], "stream": True}
    answer = requests.post(
        gateway.url + "/v1/chat/completions", json=body, headers={"Idempotency-Key": "s-1"}, timeout=30
    )
    assert answer.status_code == 200
    assert answer.headers["X-Job-Id"]
    assert answer.text.rstrip().endswith("data: [DONE]")  # every chunk, in one piece
    again = requests.post(
        gateway.url + "/v1/chat/completions", json=body, headers={"Idempotency-Key": "s-1"}, timeout=30
    )
    assert again.text == answer.text


def test_an_llm_job_header_error_is_in_openais_shape(live_gateway):
    gateway = live_gateway()
    headers = {"Prefer": "respond-async", "X-Job-Priority": "high"}
    answer = requests.post(gateway.url + "/v1/chat/completions", json=CHAT, headers=headers, timeout=5)
    assert answer.status_code == 400
    assert "X-Job-Priority" in answer.json()["error"]["message"]


def test_queue_when_offline_holds_an_ollama_request_until_a_box_comes(live_gateway, fake_llm_servers):
    gateway = live_gateway(queue_when_offline=("/api/generate",))
    body = {"model": "llama3:8b", "prompt": "Why?", "stream": False}
    accepted = requests.post(gateway.url + "/api/generate", json=body, timeout=5)
    assert accepted.status_code == 202
    box = fake_llm_servers("B1", models=["llama3:8b"])
    register(gateway, box, ["llama3:8b"])
    result = result_of(gateway, accepted.json()["job_id"])
    assert result.status_code == 200 and result.json()["done"] is True
