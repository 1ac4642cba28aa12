"""X-Allocation-Key on the LLM routes, over real HTTP, to real fake LLM servers on 127.0.0.1."""

from __future__ import annotations

import json

import pytest
import requests
from allocating import mark_down, pin_to_b2, server_of
from conftest import SECRET

CHAT = {"messages": [{"role": "user", "content": "hi"}]}
KEY = {"X-Allocation-Key": "conv-1"}


def register(gateway, box, models=None, model_map=None) -> None:
    """Register a fake LLM server, naming its models (or none: discovery, when on, finds them)."""
    body = {"server_id": box.server_id, "ip": "127.0.0.1", "port": box.port, "secret": SECRET}
    if models is not None:
        body["models"] = models
    if model_map is not None:
        body["model_map"] = model_map
    requests.post(gateway.url + "/webhook/register", json=body, timeout=5).raise_for_status()


@pytest.fixture
def pinned(live_gateway, fake_llm_servers):
    """A live gateway with B1, B2 and B3 serving llama3:8b (unless told otherwise); `conv-1` is pinned to B2."""

    def start(models=None, model_maps=None, unlisted=None, **overrides):
        gateway = live_gateway(**overrides)
        boxes = {}
        for server_id in ("B1", "B2", "B3"):
            if server_id in (unlisted or {}):  # it serves these, but registers no models
                boxes[server_id] = fake_llm_servers(server_id, models=unlisted[server_id])
                register(gateway, boxes[server_id])
                continue
            listed = (models or {}).get(server_id, ["llama3:8b"])
            boxes[server_id] = fake_llm_servers(server_id, models=listed)
            register(gateway, boxes[server_id], listed, (model_maps or {}).get(server_id))
        pin_to_b2(gateway)
        return gateway, boxes

    return start


def chat(gateway, path: str, model: str = "llama3:8b", headers=None, **extra) -> requests.Response:
    body = {"model": model, **CHAT, **extra}
    if path.startswith("/api/"):
        body.setdefault("stream", False)
    return requests.post(gateway.url + path, json=body, headers=headers, timeout=10)


def served(gateway, path: str, headers=None, count: int = 6, model: str = "llama3:8b") -> list[str]:
    return [chat(gateway, path, model, headers).headers.get("X-Backend-Server", "") for _ in range(count)]


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/api/chat", "/v1/completions", "/api/generate"])
def test_an_allocated_keys_llm_requests_go_to_its_server_and_the_others_rotate(pinned, path):
    gateway, boxes = pinned()
    assert served(gateway, path, KEY) == ["B2"] * 6
    assert set(served(gateway, path)) == {"B1", "B2", "B3"}  # rotation would have spread them
    sent = boxes["B2"].requests_to(path)[0]
    assert sent["headers"]["X-Allocation-Key"] == "conv-1"  # the header passes on, as on the proxy


def test_a_draining_server_still_serves_its_keys_llm_requests(pinned):
    gateway, _ = pinned()
    gateway.manager.set_draining("B2", True)
    assert served(gateway, "/v1/chat/completions", KEY, 3) == ["B2"] * 3


def test_the_keys_server_gets_its_own_name_for_a_mapped_model(pinned):
    maps = {"B1": {"chat": "llama3:8b"}, "B2": {"chat": "llama3:70b"}, "B3": {"chat": "llama3:8b"}}
    models = {"B2": ["llama3:70b"]}
    gateway, boxes = pinned(models=models, model_maps=maps)
    for _ in range(3):
        answer = chat(gateway, "/v1/chat/completions", "chat", KEY)
        assert answer.status_code == 200, answer.text
        assert answer.headers["X-Backend-Server"] == "B2"
        assert answer.json()["model"] == "llama3:70b"  # what B2 received
    assert boxes["B2"].requests_to("/v1/chat/completions")[-1]["body"]["model"] == "llama3:70b"


def test_a_model_the_keys_server_lacks_is_409_naming_key_server_and_model_and_goes_nowhere(pinned):
    gateway, boxes = pinned(models={"B2": ["qwen2:7b"]})
    openai = chat(gateway, "/v1/chat/completions", "llama3:8b", KEY)
    assert openai.status_code == 409
    message = openai.json()["error"]["message"]
    assert message == "allocation conv-1 is on server B2, which does not serve model 'llama3:8b'"
    assert openai.json()["error"]["code"] == "gateway_error"  # the gateway's own answer, in OpenAI's shape
    ollama = chat(gateway, "/api/chat", "llama3:8b", KEY)
    assert ollama.status_code == 409
    assert ollama.json()["error"] == message  # Ollama's shape
    assert all(not box.requests_to(path) for box in boxes.values() for path in ("/v1/chat/completions", "/api/chat"))
    assert chat(gateway, "/api/chat", "qwen2:7b", KEY).headers["X-Backend-Server"] == "B2"  # its own model goes


def test_a_keys_server_that_lists_no_models_follows_the_rules_of_routing_by_model(pinned):
    # With discovery off, B2 lists nothing: routing by model sends it only models no server lists.
    gateway, boxes = pinned(unlisted={"B2": ["llama3:8b", "mistral:7b"]}, model_discovery="off")
    listed = chat(gateway, "/v1/chat/completions", "llama3:8b", KEY)
    assert listed.status_code == 409  # B1 and B3 list it: routing by model would never pick B2 for it
    assert "server B2, which does not serve model 'llama3:8b'" in listed.json()["error"]["message"]
    assert served(gateway, "/v1/chat/completions", KEY, 3, model="mistral:7b") == ["B2"] * 3
    assert [r["body"]["model"] for r in boxes["B2"].requests_to("/v1/chat/completions")] == ["mistral:7b"] * 3


def test_an_unknown_key_is_routed_by_model_and_a_malformed_one_is_400_naming_the_header(pinned):
    gateway, _ = pinned()
    assert set(served(gateway, "/v1/chat/completions", {"X-Allocation-Key": "never-allocated"})) == {"B1", "B2", "B3"}
    bad = {"X-Allocation-Key": "has space"}
    openai = chat(gateway, "/v1/chat/completions", headers=bad)
    assert openai.status_code == 400
    assert openai.json()["error"]["message"].startswith("X-Allocation-Key: ")
    ollama = chat(gateway, "/api/chat", headers=bad)
    assert ollama.status_code == 400
    assert ollama.json()["error"].startswith("X-Allocation-Key: ")


def test_the_keys_server_down_a_moment_is_503_and_down_for_long_fails_the_key_over(pinned):
    gateway, boxes = pinned()
    boxes["B2"].stop()
    mark_down(gateway.manager, "B2")
    for path in ("/v1/chat/completions", "/api/chat"):
        down = chat(gateway, path, headers=KEY)
        assert down.status_code == 503
        assert down.headers["Retry-After"]
        assert "server B2, which holds allocation conv-1, is unhealthy" in down.text
    mark_down(gateway.manager, "B2", since="2020-01-01T00:00:00+00:00")
    moved = served(gateway, "/v1/chat/completions", KEY, 3)
    assert moved[0] in ("B1", "B3")
    assert moved == [server_of(gateway.app.test_client(), "conv-1")] * 3  # the key's new server, every time


def test_a_key_with_nowhere_to_go_is_503_on_the_llm_routes(pinned):
    gateway, boxes = pinned()
    for server_id in ("B1", "B3"):
        gateway.manager.set_draining(server_id, True)
    gateway.manager.unregister_server("B2")
    refused = chat(gateway, "/v1/chat/completions", headers=KEY)
    assert refused.status_code == 503
    assert "allocation conv-1" in refused.json()["error"]["message"]
    assert not boxes["B1"].requests_to("/v1/chat/completions") and not boxes["B3"].requests_to("/v1/chat/completions")


@pytest.mark.parametrize(
    ("path", "extra"), [("/v1/chat/completions", {"stream": True}), ("/api/chat", {})]
)  # Ollama's /api/chat streams unless told not to
def test_an_allocated_keys_answer_streams(pinned, path, extra):
    gateway, _ = pinned()
    for _ in range(2):  # rotation would have sent one of the two elsewhere
        body = {"model": "llama3:8b", **CHAT, **extra}
        with requests.post(gateway.url + path, json=body, headers=KEY, stream=True, timeout=10) as answer:
            assert answer.status_code == 200
            assert answer.headers["X-Backend-Server"] == "B2"
            assert answer.headers["X-Accel-Buffering"] == "no"
            chunks = list(answer.iter_content(chunk_size=None))
        text = b"".join(chunks).decode()
        assert all(f"[B2 llama3:8b {i}]" in text for i in range(5))
        if path.startswith("/v1/"):
            assert text.endswith("data: [DONE]\n\n")
        else:
            assert json.loads(text.splitlines()[-1])["done"] is True


def test_respond_async_with_an_allocated_key_is_forwarded_at_once_as_on_the_proxy(pinned):
    gateway, _ = pinned()
    asked = {**KEY, "Prefer": "respond-async"}
    for _ in range(2):
        answer = chat(gateway, "/v1/chat/completions", headers=asked)
        assert answer.status_code == 200
        assert answer.headers["X-Backend-Server"] == "B2"
        assert "X-Job-Id" not in answer.headers
    unknown = chat(gateway, "/v1/chat/completions", headers={"X-Allocation-Key": "nobody", "Prefer": "respond-async"})
    assert unknown.status_code == 202  # a key with no allocation: a job, as any request
