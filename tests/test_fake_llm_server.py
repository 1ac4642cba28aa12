"""The fake LLM server itself: the Ollama and OpenAI shapes the gateway's tests and demo rely on."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading

import pytest
import requests
from conftest import ROOT, SECRET, wait_until

from demo.fake_llm_server import OTHER_OPENAI_POSTS


def test_ollama_streams_ndjson_by_default_and_one_object_when_told_not_to(fake_llm_servers):
    box = fake_llm_servers("B1", models=["llama3:8b"], chunks=3)
    response = requests.post(box.url + "/api/chat", json={"model": "llama3:8b", "messages": []}, timeout=5)
    assert response.headers["Content-Type"] == "application/x-ndjson"
    lines = [json.loads(line) for line in response.text.splitlines()]
    assert [line["done"] for line in lines] == [False, False, False, True]
    assert lines[0]["message"]["content"] == "[B1 llama3:8b 0] "
    whole = requests.post(box.url + "/api/generate", json={"model": "llama3:8b", "stream": False}, timeout=5).json()
    assert whole["done"] is True
    assert whole["response"] == "[B1 llama3:8b 0] [B1 llama3:8b 1] [B1 llama3:8b 2] "


def test_openai_streams_sse_only_when_asked(fake_llm_servers):
    box = fake_llm_servers("B1", models=["m"], chunks=2)
    body = {"model": "m", "messages": [], "stream": True}
    response = requests.post(box.url + "/v1/chat/completions", json=body, timeout=5)
    assert response.headers["Content-Type"] == "text/event-stream"
    events = [line.removeprefix("data: ") for line in response.text.split("\n\n") if line]
    assert events[-1] == "[DONE]"
    assert [json.loads(e)["choices"][0]["delta"]["content"] for e in events[:-1]] == ["[B1 m 0] ", "[B1 m 1] ", ""]
    whole = requests.post(box.url + "/v1/completions", json={"model": "m", "prompt": "x"}, timeout=5).json()
    assert whole["object"] == "text_completion"
    assert whole["choices"][0]["text"] == "[B1 m 0] [B1 m 1] "


@pytest.mark.parametrize(
    ("path", "openai"), [("/v1/chat/completions", True), ("/v1/embeddings", True), ("/api/generate", False)]
)
def test_unknown_model_is_404_in_the_api_shape(fake_llm_servers, path, openai):
    box = fake_llm_servers("B1", models=["m"])
    response = requests.post(box.url + path, json={"model": "other"}, timeout=5)
    assert response.status_code == 404
    error = response.json()["error"]
    assert (error["code"] == "model_not_found") if openai else isinstance(error, str)


def test_listings_embeddings_and_records(fake_llm_servers):
    box = fake_llm_servers("B1", models=["a:1", "b:2"])
    assert [m["name"] for m in requests.get(box.url + "/api/tags", timeout=5).json()["models"]] == ["a:1", "b:2"]
    assert [m["id"] for m in requests.get(box.url + "/v1/models", timeout=5).json()["data"]] == ["a:1", "b:2"]
    one = requests.post(box.url + "/api/embed", json={"model": "a:1", "input": ["x", "y"]}, timeout=5).json()
    two = requests.post(box.url + "/v1/embeddings", json={"model": "a:1", "input": ["x"]}, timeout=5).json()
    assert one["embeddings"][0] == two["data"][0]["embedding"]  # deterministic per text
    assert box.requests_to("/api/embed")[0]["body"] == {"model": "a:1", "input": ["x", "y"]}
    assert wait_until(lambda: box.in_progress == 0)  # the handler counts down just after its reply


def test_ps_and_version_say_what_is_loaded_and_which_ollama(fake_llm_servers):
    box = fake_llm_servers("B1", models=["a:1", "b:2"], loaded=["b:2"], version="0.5.7")
    running = requests.get(box.url + "/api/ps", timeout=5).json()["models"]
    assert [(entry["name"], entry["model"]) for entry in running] == [("b:2", "b:2")]
    assert {"size", "digest", "details", "expires_at", "size_vram"} <= set(running[0])
    assert requests.get(box.url + "/api/version", timeout=5).json()["version"] == "0.5.7"
    other = fake_llm_servers("B2", models=["c"])  # every model is loaded unless told otherwise
    assert [entry["name"] for entry in requests.get(other.url + "/api/ps", timeout=5).json()["models"]] == ["c"]


def test_a_listing_gate_holds_ps_and_version_until_it_opens(fake_llm_servers):
    gate = threading.Event()
    box = fake_llm_servers("B1", models=["m"], listing_gate=gate)
    with pytest.raises(requests.Timeout):
        requests.get(box.url + "/api/ps", timeout=0.5)
    gate.set()
    assert requests.get(box.url + "/api/version", timeout=5).status_code == 200


@pytest.mark.parametrize("path", OTHER_OPENAI_POSTS)
def test_other_openai_posts_say_which_path_and_model_arrived(fake_llm_servers, path):
    box = fake_llm_servers("B1", models=["m"])
    answer = requests.post(box.url + path, json={"model": "m", "input": "x"}, timeout=5).json()
    assert (answer["path"], answer["model"], answer["fields"]) == (path, "m", ["input", "model"])
    assert requests.post(box.url + path, json={"model": "other"}, timeout=5).status_code == 404


def test_a_transcription_is_a_form_with_a_file(fake_llm_servers):
    box = fake_llm_servers("B1", models=["whisper-1"])
    files = {"file": ("a.wav", b"RIFF\x00\x01" * 100, "audio/wav")}
    response = requests.post(box.url + "/v1/audio/transcriptions", data={"model": "whisper-1"}, files=files, timeout=5)
    assert response.json()["fields"] == ["file", "model"]
    assert box.requests_to("/v1/audio/transcriptions")[0]["body"]["file"] == {"filename": "a.wav", "size": 600}
    response = requests.post(box.url + "/v1/audio/transcriptions", data={"model": "x"}, files=files, timeout=5)
    assert response.status_code == 404


def test_the_cli_registers_its_models_with_a_gateway(live_gateway, tmp_path):
    gateway = live_gateway()
    env = {**os.environ, "WEBHOOK_SECRET": SECRET}
    command = [sys.executable, "demo/fake_llm_server.py", "--server-id", "L1", "--models", "llama3:8b,qwen2:7b"]
    command += ["--model-map", "chat=llama3:8b", "--register-to", gateway.url]
    with open(tmp_path / "fake.log", "wb") as log:
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        assert wait_until(lambda: gateway.manager.get_server("L1") is not None, timeout=20)
        server = gateway.manager.get_server("L1")
        assert server.models == ["llama3:8b", "qwen2:7b"]
        assert server.model_map == {"chat": "llama3:8b"}
        assert requests.get(server.url + "/health", timeout=5).status_code == 200
    finally:
        process.terminate()
        process.wait(timeout=10)
