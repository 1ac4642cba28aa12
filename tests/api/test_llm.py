"""The LLM routes over real HTTP: a live gateway in front of fake Ollama/OpenAI servers on 127.0.0.1."""

from __future__ import annotations

import json
import threading
import time

import pytest
import requests
from conftest import SECRET, wait_until

from gateway.api import llm
from gateway.errors import error_response

OPENAI_ROUTES = ["/v1/chat/completions", "/v1/completions", "/v1/embeddings"]
OLLAMA_ROUTES = ["/api/generate", "/api/chat", "/api/embed", "/api/embeddings", "/api/show"]


def register(gateway, server, models=None, model_map=None, **options) -> None:
    """Register a fake LLM server, naming its models (or not, to leave them to discovery)."""
    body = {"server_id": server.server_id, "ip": "127.0.0.1", "port": server.port, "secret": SECRET, **options}
    if models is not None:
        body["models"] = models
    if model_map is not None:
        body["model_map"] = model_map
    response = requests.post(gateway.url + "/webhook/register", json=body, timeout=5)
    assert response.status_code in (200, 201), response.text


def body_for(path: str, model: str, **extra: object) -> dict:
    """A minimal request body for each API endpoint."""
    if path.endswith("chat") or path.endswith("chat/completions"):
        return {"model": model, "messages": [{"role": "user", "content": "hi"}], **extra}
    if path in ("/api/embed", "/v1/embeddings"):
        return {"model": model, "input": "hi", **extra}
    if path == "/api/embeddings":
        return {"model": model, "prompt": "hi", **extra}
    if path == "/api/show":
        return {"model": model, **extra}
    return {"model": model, "prompt": "hi", **extra}


def post(gateway, path: str, model: str, headers: dict | None = None, **extra: object) -> requests.Response:
    if path in ("/api/generate", "/api/chat"):
        extra.setdefault("stream", False)
    return requests.post(gateway.url + path, json=body_for(path, model, **extra), headers=headers, timeout=10)


@pytest.fixture
def two_models(live_gateway, fake_llm_servers):
    """B1 serves llama3:8b, B2 serves qwen2:7b."""
    gateway = live_gateway()
    b1 = fake_llm_servers("B1", models=["llama3:8b"])
    b2 = fake_llm_servers("B2", models=["qwen2:7b"])
    register(gateway, b1, models=["llama3:8b"])
    register(gateway, b2, models=["qwen2:7b"])
    return gateway, b1, b2


# -- which rule answers ------------------------------------------------------------------


def test_llm_paths_win_over_the_api_prefix(app):
    urls = app.url_map.bind("localhost")
    for path in OLLAMA_ROUTES:
        assert urls.match(path, method="POST")[0].startswith("llm_ollama")
    assert urls.match("/api/tags", method="GET")[0] == "llm_ollama_tags"
    assert urls.match("/v1/models", method="GET")[0] == "llm_openai_models"
    for path in OPENAI_ROUTES:
        assert urls.match(path, method="POST")[0].startswith("llm_openai")
    # Everything else under /api/ is still the generic proxy's, other methods on these paths too.
    others = [("POST", "/api/pull"), ("GET", "/api/generate"), ("OPTIONS", "/api/chat"), ("POST", "/api/generate/x")]
    for method, path in others:
        assert urls.match(path, method=method)[0] == "proxy_0"


def test_other_api_paths_still_go_through_the_generic_proxy(live_gateway, fake_servers):
    gateway = live_gateway()
    gpu = fake_servers("G1")
    gateway.register(gpu)
    response = requests.post(gateway.url + "/api/enhance-x?a=1", data=b"raw", timeout=5)
    assert response.status_code == 200
    assert response.headers["X-Backend-Server"] == "G1"
    assert response.json()["path"] == "/api/enhance-x"


def test_with_llm_routes_off_api_generate_is_proxied_generically(live_gateway, fake_llm_servers):
    gateway = live_gateway(llm_routes=False)
    box = fake_llm_servers("B1", models=["llama3:8b"])
    register(gateway, box, models=["llama3:8b"])
    raw = b'{"model": "llama3:8b", "prompt": "hi", "stream": false}'
    response = requests.post(gateway.url + "/api/generate", data=raw, timeout=5)
    assert response.status_code == 200
    assert response.headers["X-Backend-Server"] == "B1"
    assert box.requests_to("/api/generate")[-1]["raw"] == raw
    # An unknown model is the backend's business here, not the gateway's.
    response = requests.post(gateway.url + "/api/generate", json={"model": "nope"}, timeout=5)
    assert response.status_code == 404
    assert response.json()["server_id"] == "B1"
    assert requests.get(gateway.url + "/v1/models", timeout=5).status_code == 404  # not a route at all


# -- routing by model --------------------------------------------------------------------


@pytest.mark.parametrize("path", OPENAI_ROUTES + OLLAMA_ROUTES)
def test_each_request_goes_to_a_server_with_its_model(two_models, path):
    gateway, b1, b2 = two_models
    for model, server in [("llama3:8b", b1), ("qwen2:7b", b2), ("llama3:8b", b1), ("qwen2:7b", b2)]:
        response = post(gateway, path, model)
        assert response.status_code == 200, response.text
        assert response.headers["X-Backend-Server"] == server.server_id
        assert response.json()["server_id"] == server.server_id
    assert len(b1.requests_to(path)) == 2
    assert len(b2.requests_to(path)) == 2


def test_model_map_rewrites_the_model_and_keeps_the_rest(live_gateway, fake_llm_servers):
    gateway = live_gateway()
    box = fake_llm_servers("B1", models=["llama3:8b-instruct-q4_K_M", "qwen2:7b"])
    register(gateway, box, models=["qwen2:7b"], model_map={"chat-default": "llama3:8b-instruct-q4_K_M"})
    body = {"model": "chat-default", "messages": [{"role": "user", "content": "héllo ✓ \u2028"}], "temperature": 0.2}
    response = requests.post(gateway.url + "/v1/chat/completions", json=body, timeout=5)
    assert response.status_code == 200, response.text
    assert response.json()["model"] == "llama3:8b-instruct-q4_K_M"  # what the server received
    sent = box.requests_to("/v1/chat/completions")[-1]
    assert sent["body"] == {**body, "model": "llama3:8b-instruct-q4_K_M"}
    assert sent["raw"] == json.dumps(sent["body"], ensure_ascii=False, separators=(",", ":")).encode()


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/api/generate"])
def test_a_mapped_model_with_a_lone_surrogate_in_the_body_keeps_it_escaped(live_gateway, fake_llm_servers, path):
    gateway = live_gateway()
    box = fake_llm_servers("B1", models=["llama3:8b"])
    register(gateway, box, model_map={"chat-default": "llama3:8b"})
    raw = (
        b'{"model": "chat-default", "prompt": "a\\ud800b \xe2\x9c\x93", "stream": false}'  # valid JSON, no UTF-8 for it
    )

    response = requests.post(gateway.url + path, data=raw, headers={"Content-Type": "application/json"}, timeout=5)

    assert response.status_code == 200, response.text  # was a 500: UnicodeEncodeError
    sent = box.requests_to(path)[-1]
    assert sent["body"] == {"model": "llama3:8b", "prompt": "a\ud800b \u2713", "stream": False}
    assert b"\\ud800" in sent["raw"]


def test_an_unmapped_model_is_forwarded_byte_for_byte(live_gateway, fake_llm_servers):
    gateway = live_gateway()
    box = fake_llm_servers("B1", models=["qwen2:7b", "llama3:8b"])
    register(gateway, box, models=["qwen2:7b"], model_map={"chat-default": "llama3:8b"})
    raw = b'{ "model" :  "qwen2:7b", "prompt": "caf\\u00e9 \xe2\x9c\x93", "stream": false, "options": {"seed": 1} }'
    response = requests.post(
        gateway.url + "/api/generate?keep=1&x=%2F", data=raw, headers={"Content-Type": "application/json"}, timeout=5
    )
    assert response.status_code == 200, response.text
    sent = box.requests_to("/api/generate")[-1]
    assert sent["raw"] == raw
    assert sent["query"] == {"keep": "1", "x": "/"}


def test_api_show_also_takes_the_older_name_field(live_gateway, fake_llm_servers):
    gateway = live_gateway()
    box = fake_llm_servers("B1", models=["llama3:8b-instruct"])
    register(gateway, box, model_map={"llama3": "llama3:8b-instruct"})
    response = requests.post(gateway.url + "/api/show", json={"name": "llama3", "verbose": True}, timeout=5)
    assert response.status_code == 200, response.text
    assert box.requests_to("/api/show")[-1]["body"] == {"name": "llama3:8b-instruct", "verbose": True}


def test_the_fallback_gets_the_body_as_sent(live_gateway, fake_llm_servers):
    fallback = fake_llm_servers("FB", models=["mystery:1b"])
    gateway = live_gateway(backend_api_base=fallback.url)
    box = fake_llm_servers("B1", models=["llama3:8b"])
    register(gateway, box, models=["llama3:8b"])
    response = post(gateway, "/api/generate", "mystery:1b")
    assert response.status_code == 200, response.text
    assert response.headers["X-Backend-Server"] == "fallback"
    assert response.json()["server_id"] == "FB"


# -- streaming ---------------------------------------------------------------------------


def read_stream(url: str, body: dict) -> tuple[float, float, list[bytes], requests.structures.CaseInsensitiveDict]:
    """POST and read the streamed answer: (seconds to the first chunk, seconds to the end, chunks, headers)."""
    started = time.perf_counter()
    with requests.post(url, json=body, stream=True, timeout=30) as response:
        assert response.status_code == 200, response.text
        chunks = response.iter_content(chunk_size=None)
        received = [next(chunks)]
        first = time.perf_counter() - started
        received += list(chunks)
        total = time.perf_counter() - started
        return first, total, received, response.headers


@pytest.mark.parametrize(
    ("path", "body", "content_type"),
    [
        ("/v1/chat/completions", {"messages": [], "stream": True}, "text/event-stream"),
        ("/v1/completions", {"prompt": "hi", "stream": True}, "text/event-stream"),
        ("/api/generate", {"prompt": "hi"}, "application/x-ndjson"),  # Ollama streams by default
        ("/api/chat", {"messages": [], "stream": True}, "application/x-ndjson"),
    ],
)
def test_streams_arrive_chunk_by_chunk(live_gateway, fake_llm_servers, path, body, content_type, capsys):
    gateway = live_gateway()
    box = fake_llm_servers("B1", models=["llama3:8b"], chunks=5, chunk_delay=0.3)
    register(gateway, box, models=["llama3:8b"])
    body = {"model": "llama3:8b", **body}
    direct_first, direct_total, _, _ = read_stream(box.url + path, body)
    first, total, chunks, headers = read_stream(gateway.url + path, body)
    assert headers["Content-Type"] == content_type
    assert headers["X-Accel-Buffering"] == "no"
    assert headers["Cache-Control"] == "no-cache"
    assert headers["X-Backend-Server"] == "B1"
    text = b"".join(chunks).decode()
    assert all(f"[B1 llama3:8b {i}]" in text for i in range(5))
    if content_type == "text/event-stream":
        assert text.endswith("data: [DONE]\n\n")
    else:
        assert json.loads(text.splitlines()[-1])["done"] is True
    assert len(chunks) >= 3  # the tokens came as separate pieces, not one buffered blob
    assert first < 0.5 * total  # the first token came long before the last (about 1.2 s later)
    assert first < direct_first + 1.0  # a generous bound; the figures are printed below
    with capsys.disabled():
        print(
            f"\n{path}: first chunk direct {direct_first * 1000:.1f} ms, through the gateway {first * 1000:.1f} ms;"
            f" whole stream {direct_total:.2f} s direct, {total:.2f} s through the gateway"
        )


def test_non_streamed_answers_carry_no_stream_headers(two_models):
    gateway, _, _ = two_models
    response = post(gateway, "/api/generate", "llama3:8b")  # "stream": false
    assert response.status_code == 200
    assert "X-Accel-Buffering" not in response.headers
    assert response.json()["done"] is True
    response = post(gateway, "/v1/chat/completions", "qwen2:7b")  # OpenAI: no "stream" means none
    assert "X-Accel-Buffering" not in response.headers
    assert response.json()["object"] == "chat.completion"


def test_client_leaving_a_stream_closes_the_upstream_and_frees_the_slot(live_gateway, fake_llm_servers):
    gateway = live_gateway()
    gate = threading.Event()
    box = fake_llm_servers("B1", models=["llama3:8b"], chunks=200, chunk_delay=0.01, gate=gate)
    register(gateway, box, models=["llama3:8b"], max_concurrent=1)
    response = requests.post(
        gateway.url + "/v1/chat/completions",
        json={"model": "llama3:8b", "messages": [], "stream": True},
        stream=True,
        timeout=10,
    )
    assert b"[B1 llama3:8b 0]" in next(response.iter_content(chunk_size=None))
    assert in_flight(gateway, "B1") == 1
    response.close()
    gate.set()
    assert wait_until(lambda: box.aborted_streams == 1, timeout=15)
    assert wait_until(lambda: in_flight(gateway, "B1") == 0, timeout=15)
    assert wait_until(lambda: box.in_progress == 0, timeout=15)
    # The slot is free again: with max_concurrent=1 a new request gets it at once.
    assert post(gateway, "/v1/chat/completions", "llama3:8b").status_code == 200


def in_flight(gateway, server_id: str) -> int:
    rows = gateway.manager.describe_servers()
    return next(row["in_flight"] for row in rows if row["server_id"] == server_id)


# -- errors ------------------------------------------------------------------------------


def test_unknown_model_is_404_in_each_api_shape(two_models):
    gateway, b1, b2 = two_models
    response = post(gateway, "/v1/chat/completions", "gpt-17")
    assert response.status_code == 404
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == "model"
    assert error["code"] == "model_not_found"
    assert "gpt-17" in error["message"]
    response = post(gateway, "/api/chat", "gpt-17")
    assert response.status_code == 404
    assert set(response.json()) == {"error"}
    assert "gpt-17" in response.json()["error"]
    assert not b1.requests_to("/v1/chat/completions") + b2.requests_to("/api/chat")


def test_a_model_whose_servers_are_all_down_is_503_with_retry_after(two_models):
    gateway, b1, _ = two_models
    b1.healthy = False
    for _ in range(3):  # HEALTH_CHECK_FAILURES
        gateway.manager.run_health_sweep()
    response = post(gateway, "/v1/completions", "llama3:8b")
    assert response.status_code == 503
    assert response.headers["Retry-After"] == "5"  # not HEALTH_CHECK_INTERVAL (3600 here)
    assert response.json()["error"]["type"] == "server_error"
    assert response.json()["error"]["code"] == "model_unavailable"
    response = post(gateway, "/api/generate", "llama3:8b")
    assert response.status_code == 503
    assert response.headers["Retry-After"] == "5"
    assert isinstance(response.json()["error"], str)
    assert post(gateway, "/api/generate", "qwen2:7b").status_code == 200  # the other model is unaffected
    assert [m["name"] for m in requests.get(gateway.url + "/api/tags", timeout=5).json()["models"]] == ["qwen2:7b"]


BAD_BODIES = [
    (b"{not json", "not valid JSON", None),
    (b"", "not valid JSON", None),
    (b"[1, 2]", "must be a JSON object", None),
    (b'"llama3"', "must be a JSON object", None),
    (b'{"prompt": "hi"}', "must name a 'model'", "model"),
    (b'{"model": 3}', "'model' must be a string", "model"),
    (b'{"model": ["a"]}', "'model' must be a string", "model"),
    (b'{"model": ""}', "'model' must not be empty", "model"),
    (b"[" * 100_000 + b"]" * 100_000, "not valid JSON", None),
]


@pytest.mark.parametrize(("raw", "problem", "param"), BAD_BODIES)
def test_a_bad_body_is_400_naming_the_problem(two_models, raw, problem, param):
    gateway, b1, b2 = two_models
    response = requests.post(gateway.url + "/v1/chat/completions", data=raw, timeout=5)
    assert response.status_code == 400
    error = response.json()["error"]
    assert problem in error["message"]
    assert (error["type"], error["param"]) == ("invalid_request_error", param)
    response = requests.post(gateway.url + "/api/generate", data=raw, timeout=5)
    assert response.status_code == 400
    assert problem in response.json()["error"]
    assert len(b1.requests) + len(b2.requests) == 0


def test_a_body_over_the_limit_is_413_in_the_api_shape(live_gateway, fake_llm_servers):
    gateway = live_gateway(proxy_max_body_bytes=1000)
    box = fake_llm_servers("B1", models=["llama3:8b"])
    register(gateway, box, models=["llama3:8b"])
    response = post(gateway, "/v1/completions", "llama3:8b", prompt="x" * 2000)
    assert response.status_code == 413
    assert "1000 bytes" in response.json()["error"]["message"]
    response = post(gateway, "/api/generate", "llama3:8b", prompt="x" * 2000)
    assert response.status_code == 413
    assert "1000 bytes" in response.json()["error"]
    assert not box.requests_to("/v1/completions") + box.requests_to("/api/generate")


# -- model lists -------------------------------------------------------------------------


def test_model_lists_are_the_union_under_virtual_names(live_gateway, fake_llm_servers):
    gateway = live_gateway()
    b1 = fake_llm_servers("B1", models=["llama3:8b", "qwen2:7b"])
    b2 = fake_llm_servers("B2", models=["qwen2:7b", "mistral-7b-instruct-v0.3.Q4_K_M"])
    register(gateway, b1, models=["llama3:8b", "qwen2:7b"])
    register(gateway, b2, models=["qwen2:7b"], model_map={"mistral:7b": "mistral-7b-instruct-v0.3.Q4_K_M"})
    expected = ["llama3:8b", "mistral:7b", "qwen2:7b"]
    listing = requests.get(gateway.url + "/v1/models", timeout=5).json()
    assert listing["object"] == "list"
    assert [entry["id"] for entry in listing["data"]] == expected
    assert listing["data"][0] == {"id": "llama3:8b", "object": "model", "created": 0, "owned_by": "gpu-gateway"}
    tags = requests.get(gateway.url + "/api/tags", timeout=5).json()["models"]
    assert [(entry["name"], entry["model"]) for entry in tags] == [(name, name) for name in expected]
    assert post(gateway, "/v1/chat/completions", "mistral:7b").json()["model"] == "mistral-7b-instruct-v0.3.Q4_K_M"


def test_model_lists_are_empty_without_servers(live_gateway):
    gateway = live_gateway()
    assert requests.get(gateway.url + "/v1/models", timeout=5).json() == {"object": "list", "data": []}
    assert requests.get(gateway.url + "/api/tags", timeout=5).json() == {"models": []}


def test_discovered_models_are_routed_and_listed(live_gateway, fake_llm_servers):
    gateway = live_gateway()
    b1 = fake_llm_servers("B1", models=["llama3:8b"])
    b2 = fake_llm_servers("B2", models=["qwen2:7b"])
    register(gateway, b1)  # no models: the health sweep asks the server
    register(gateway, b2)
    gateway.manager.run_health_sweep()
    names = [entry["id"] for entry in requests.get(gateway.url + "/v1/models", timeout=5).json()["data"]]
    assert names == ["llama3:8b", "qwen2:7b"]
    for _ in range(2):
        assert post(gateway, "/api/chat", "qwen2:7b").headers["X-Backend-Server"] == "B2"
        assert post(gateway, "/api/chat", "llama3:8b").headers["X-Backend-Server"] == "B1"


# -- failover and stickiness -------------------------------------------------------------


def test_a_killed_server_is_skipped_with_no_error_to_the_client(live_gateway, fake_llm_servers):
    gateway = live_gateway()
    b1 = fake_llm_servers("B1", models=["llama3:8b"])
    b2 = fake_llm_servers("B2", models=["llama3:8b"])
    register(gateway, b1, models=["llama3:8b"])
    register(gateway, b2, models=["llama3:8b"])
    b1.stop()
    for path in ("/v1/chat/completions", "/api/generate", "/v1/chat/completions", "/api/generate"):
        response = post(gateway, path, "llama3:8b")
        assert response.status_code == 200, response.text
        assert response.headers["X-Backend-Server"] == "B2"
    _, _, chunks, headers = read_stream(gateway.url + "/api/chat", {"model": "llama3:8b", "messages": []})
    assert headers["X-Backend-Server"] == "B2"
    assert b"[B2 llama3:8b 4]" in b"".join(chunks)


def test_every_server_of_a_model_dead_is_503_with_retry_after_in_each_api_shape(live_gateway, fake_llm_servers):
    gateway = live_gateway()
    for server_id in ("B1", "B2"):
        server = fake_llm_servers(server_id, models=["llama3:8b"])
        register(gateway, server, models=["llama3:8b"])
        server.stop()
    response = post(gateway, "/v1/chat/completions", "llama3:8b")
    assert response.status_code == 503
    assert response.headers["Retry-After"] == "5"
    assert "failed to connect: B1, B2" in response.json()["error"]["message"]
    assert response.json()["error"]["code"] == "model_unavailable"
    response = post(gateway, "/api/generate", "llama3:8b")
    assert response.status_code == 503
    assert response.headers["Retry-After"] == "5"
    assert "failed to connect" in response.json()["error"]


def test_one_session_key_stays_on_one_server(live_gateway, fake_llm_servers):
    gateway = live_gateway()
    servers = [fake_llm_servers(f"B{i}", models=["llama3:8b"]) for i in (1, 2, 3)]
    for server in servers:
        register(gateway, server, models=["llama3:8b"])

    def served(path: str, headers: dict | None = None, **extra: object) -> set[str]:
        return {post(gateway, path, "llama3:8b", headers, **extra).headers["X-Backend-Server"] for _ in range(6)}

    assert len(served("/api/chat", {"X-Session-Key": "conversation-42"})) == 1
    assert len(served("/v1/chat/completions", {"X-Session-Key": "conversation-42"})) == 1
    assert len(served("/v1/chat/completions", user="alice@example.com")) == 1  # OpenAI's `user` is a key too
    assert len(served("/v1/chat/completions")) == 3  # with no key, requests spread
    keyed = [post(gateway, "/api/chat", "llama3:8b", {"X-Session-Key": f"k{i}"}) for i in range(30)]
    keys = {response.headers["X-Backend-Server"] for response in keyed}
    assert len(keys) > 1  # different keys land on different servers


# -- as deployed -------------------------------------------------------------------------


def metric(url: str, line_start: str) -> float | None:
    text = requests.get(url + "/metrics", timeout=5).text
    return next((float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(line_start)), None)


def test_gunicorn_with_gevent_streams_token_by_token_and_frees_left_streams(gateway_process, fake_llm_servers):
    gateway = gateway_process()
    gate = threading.Event()
    box = fake_llm_servers("B1", models=["llama3:8b"], chunks=5, chunk_delay=0.3)
    register(gateway, box, models=["llama3:8b"])
    body = {"model": "llama3:8b", "prompt": "hi"}
    first, total, chunks, headers = read_stream(gateway.url + "/api/generate", body)
    assert headers["X-Accel-Buffering"] == "no"  # answered by the LLM route, not the generic proxy
    assert first < 0.5 * total
    assert len(chunks) >= 3
    # A client that leaves mid-stream: gevent's write fails, the upstream is closed, the slot freed.
    box.chunks, box.chunk_delay, box.gate = 200, 0.01, gate
    response = requests.post(gateway.url + "/api/generate", json=body, stream=True, timeout=10)
    assert b"[B1 llama3:8b 0]" in next(response.iter_content(chunk_size=None))
    response.close()
    gate.set()
    assert wait_until(lambda: box.aborted_streams == 1, timeout=15)
    assert wait_until(lambda: metric(gateway.url, 'gateway_requests_in_flight{server="B1"}') == 0, timeout=15)


def test_a_gateway_error_is_reshaped_and_its_close_callbacks_still_run(app):
    released = []
    with app.test_request_context("/v1/chat/completions", method="POST"):
        original = error_response(502, "backend B1: broke off the answer", headers={"X-Backend-Server": "B1"})
        original.call_on_close(lambda: released.append(True))
        reshaped = llm.in_dialect(original, llm.OPENAI)
    assert released == [True]
    assert reshaped.status_code == 502
    assert reshaped.headers["X-Backend-Server"] == "B1"
    assert reshaped.get_json()["error"]["message"] == "backend B1: broke off the answer"
