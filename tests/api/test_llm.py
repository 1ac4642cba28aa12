"""The LLM routes over real HTTP: a live gateway in front of fake Ollama/OpenAI servers on 127.0.0.1."""

from __future__ import annotations

import json
import threading
import time

import pytest
import requests
from conftest import SECRET, wait_until

from demo.fake_llm_server import OTHER_OPENAI_POSTS
from gateway.api import llm, llm_request
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


# -- one model by its id (GET /v1/models/<id>) -------------------------------------------


@pytest.fixture
def named_models(live_gateway, fake_llm_servers):
    """B1 serves names with slashes and colons, and `chat` as its own qwen3:32b-q4."""
    gateway = live_gateway()
    models = ["meta-llama/Llama-3-8B", "qwen3:14b", "llama3", "qwen3:32b-q4"]
    box = fake_llm_servers("B1", models=models)
    register(gateway, box, models=models, model_map={"chat": "qwen3:32b-q4"})
    return gateway


@pytest.mark.parametrize(
    ("asked", "listed"),
    [
        ("meta-llama/Llama-3-8B", "meta-llama/Llama-3-8B"),
        ("meta-llama%2FLlama-3-8B", "meta-llama/Llama-3-8B"),  # as an SDK may encode it
        ("qwen3:14b", "qwen3:14b"),
        ("chat", "chat"),
        ("llama3:latest", "llama3"),  # Ollama's rule: the same model, under the name the list shows
    ],
)
def test_one_model_is_retrieved_by_its_id(named_models, asked, listed):
    response = requests.get(named_models.url + "/v1/models/" + asked, timeout=5)
    assert response.status_code == 200, response.text
    assert response.json() == {"id": listed, "object": "model", "created": 0, "owned_by": "gpu-gateway"}


def test_an_unknown_model_id_is_404_in_openais_shape(named_models):
    # A server's own name for a mapped model is not listed, so not retrieved either: as in GET /v1/models.
    assert requests.get(named_models.url + "/v1/models/qwen3:32b-q4", timeout=5).status_code == 404
    response = requests.get(named_models.url + "/v1/models/meta-llama/Llama-3-70B", timeout=5)
    assert response.status_code == 404
    assert response.json() == {
        "error": {
            "message": "model 'meta-llama/Llama-3-70B' is not served by any server",
            "type": "invalid_request_error",
            "param": "model",
            "code": "model_not_found",
        }
    }


# -- every error under /v1/ in OpenAI's shape --------------------------------------------


def assert_openai_error(response: requests.Response, status: int, problem: str) -> dict:
    assert response.status_code == status, response.text
    document = response.json()
    assert set(document) == {"error"}
    error = document["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == ("invalid_request_error" if status < 500 else "server_error")
    assert problem in error["message"]
    return error


@pytest.mark.parametrize(
    ("method", "path", "status", "problem"),
    [
        ("GET", "/v1/files", 404, "GET /v1/files is not served"),
        ("DELETE", "/v1/batches/b1", 404, "DELETE /v1/batches/b1 is not served"),
        ("GET", "/v1", 404, "GET /v1 is not served"),
        ("GET", "/v1/chat/completions", 405, "GET is not allowed on /v1/chat/completions"),
        ("PUT", "/v1/models", 405, "PUT is not allowed on /v1/models"),
    ],
)
def test_an_unknown_path_or_method_under_v1_is_an_openai_error(two_models, method, path, status, problem):
    gateway, _, _ = two_models
    response = requests.request(method, gateway.url + path, timeout=5)
    assert_openai_error(response, status, problem)
    if status == 405:
        assert "POST" in response.headers["Allow"] or "GET" in response.headers["Allow"]


def test_a_path_that_climbs_out_of_v1_is_refused(two_models):
    gateway, b1, b2 = two_models
    response = requests.post(gateway.url + "/v1/%2e%2e/admin/servers", json={"model": "llama3:8b"}, timeout=5)
    assert_openai_error(response, 400, "'.' or '..'")
    assert not b1.requests + b2.requests


def test_a_looping_request_is_508_in_openais_shape(two_models):
    gateway, _, _ = two_models
    from gateway.proxy.forwarding import VIA

    response = post(gateway, "/v1/chat/completions", "llama3:8b", headers={"Via": VIA})
    assert_openai_error(response, 508, "already passed through this gateway")


def test_no_server_at_all_is_503_with_retry_after_in_openais_shape(live_gateway):
    gateway = live_gateway()
    response = requests.post(gateway.url + "/v1/responses", json={"model": "m", "input": "hi"}, timeout=5)
    assert_openai_error(response, 503, "no healthy GPU server")
    assert response.headers["Retry-After"]


@pytest.mark.parametrize(("path", "openai"), [("/v1/models", True), ("/api/tags", False), ("/api/ps", False)])
def test_an_unforeseen_failure_is_500_in_the_apis_shape(make_app, monkeypatch, path, openai):
    app = make_app()
    app.config["PROPAGATE_EXCEPTIONS"] = False  # as in production: the error handler answers

    def broken(*args, **kwargs):
        raise RuntimeError("unforeseen")

    monkeypatch.setattr(app.extensions["backend_manager"], "model_catalog", broken)
    monkeypatch.setattr(app.extensions["backend_manager"], "list_servers", broken)
    response = app.test_client().get(path)
    assert response.status_code == 500
    error = response.get_json()["error"]
    assert (error["type"] == "server_error") if openai else isinstance(error, str)


def test_proxied_api_paths_keep_the_gateways_own_error_shape(live_gateway):
    gateway = live_gateway()
    response = requests.get(gateway.url + "/api/status/t1", timeout=5)  # no server: the proxy's 503
    assert response.status_code == 503
    assert response.json()["success"] is False
    response = requests.request("TRACE", gateway.url + "/api/generate", timeout=5)  # no method of the proxy's
    assert response.status_code == 405
    assert response.json()["success"] is False


# -- every OpenAI POST that names a model is routed by it --------------------------------


@pytest.mark.parametrize("path", OTHER_OPENAI_POSTS)  # JSON bodies: the fake takes them on every one
def test_more_openai_posts_are_routed_by_their_model(two_models, path):
    gateway, b1, b2 = two_models
    for model, server in [("llama3:8b", b1), ("qwen2:7b", b2), ("llama3:8b", b1), ("qwen2:7b", b2)]:
        raw = json.dumps({"model": model, "input": "hi"}).encode()
        response = requests.post(gateway.url + path, data=raw, headers={"Content-Type": "application/json"}, timeout=5)
        assert response.status_code == 200, response.text
        assert response.headers["X-Backend-Server"] == server.server_id
        assert response.json()["path"] == path
        assert server.requests_to(path)[-1]["raw"] == raw
    assert_openai_error(requests.post(gateway.url + path, json={"input": "hi"}, timeout=5), 400, "'model'")
    assert_openai_error(requests.post(gateway.url + path, json={"model": "gpt-17"}, timeout=5), 404, "gpt-17")


def test_a_post_under_v1_the_gateway_has_never_heard_of_is_routed_by_its_model(two_models):
    gateway, b1, b2 = two_models
    response = requests.post(gateway.url + "/v1/audio/future?x=1", json={"model": "qwen2:7b"}, timeout=5)
    assert response.headers["X-Backend-Server"] == "B2"
    assert response.status_code == 404  # the server's own answer: it has no such route
    assert b2.requests_to("/v1/audio/future")[-1]["query"] == {"x": "1"}
    assert not b1.requests


BOUNDARY = "gw-5f2b9c0e"


def multipart(*parts: tuple[str, bytes, str | None], boundary: str = BOUNDARY) -> bytes:
    """A multipart/form-data body of (name, value, filename or None) parts, as a client writes one."""
    out = b""
    for name, value, filename in parts:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        kind = "Content-Type: audio/wav\r\n" if filename else ""
        out += f"--{boundary}\r\nContent-Disposition: {disposition}\r\n{kind}\r\n".encode() + value + b"\r\n"
    return out + f"--{boundary}--\r\n".encode()


def post_form(gateway, raw: bytes, boundary: str = BOUNDARY, path: str = "/v1/audio/transcriptions"):
    headers = {"Content-Type": f"multipart/form-data; boundary={boundary}"}
    return requests.post(gateway.url + path, data=raw, headers=headers, timeout=10)


AUDIO = bytes(range(256)) * 1500  # 384 KB with every byte value, CR, LF and '-' among them


@pytest.mark.parametrize("model_first", [True, False])
def test_a_transcription_form_is_routed_by_its_model_field_and_sent_byte_for_byte(two_models, model_first):
    gateway, b1, b2 = two_models
    parts = [("file", AUDIO, "a.wav"), ("response_format", b"json", None)]
    model = ("model", b"qwen2:7b", None)
    raw = multipart(*([model, *parts] if model_first else [*parts, model]))
    response = post_form(gateway, raw)
    assert response.status_code == 200, response.text
    assert response.headers["X-Backend-Server"] == "B2"
    assert response.json()["fields"] == ["file", "model", "response_format"]
    assert b2.requests_to("/v1/audio/transcriptions")[-1]["raw"] == raw
    assert not b1.requests


def test_a_mapped_model_in_a_form_is_renamed_and_nothing_else_changes(live_gateway, fake_llm_servers):
    gateway = live_gateway()
    box = fake_llm_servers("B1", models=["openai/whisper-large-v3"])
    register(gateway, box, model_map={"whisper-1": "openai/whisper-large-v3"})
    before, after = [("file", AUDIO, "a.wav")], [("language", b"en", None)]
    response = post_form(gateway, multipart(*before, ("model", b"whisper-1", None), *after))
    assert response.status_code == 200, response.text
    expected = multipart(*before, ("model", b"openai/whisper-large-v3", None), *after)
    assert box.requests_to("/v1/audio/transcriptions")[-1]["raw"] == expected


BAD_FORMS = [
    (multipart(("file", b"x", "a.wav")), BOUNDARY, "the form must have a 'model' field"),
    (multipart(("model", b"", None)), BOUNDARY, "'model' must not be empty"),
    (multipart(("model", b"m" * 2000, None)), BOUNDARY, "'model' is over 1024 bytes"),
    (multipart(("model", b"\xff\xfe", None)), BOUNDARY, "'model' must be UTF-8 text"),
    (multipart(("model", b"llama3:8b", "model.txt")), BOUNDARY, "'model' must be a form field, not a file"),
    (multipart(("model", b"llama3:8b", None))[:-30], BOUNDARY, "the multipart/form-data body is malformed"),
    (b"just some bytes", BOUNDARY, "the multipart/form-data body is malformed"),
    (multipart(("model", b"llama3:8b", None)), "", "needs a boundary"),
    (multipart(("model", b"llama3:8b", None), boundary="b" * 71), "b" * 71, "needs a boundary"),
    (
        b"--" + BOUNDARY.encode() + b"\r\nX-No-Disposition: 1\r\n\r\nv\r\n--" + BOUNDARY.encode() + b"--\r\n",
        BOUNDARY,
        "malformed",
    ),
]


@pytest.mark.parametrize(("raw", "boundary", "problem"), BAD_FORMS, ids=[problem for _, _, problem in BAD_FORMS])
def test_a_bad_form_is_400_naming_the_problem(two_models, raw, boundary, problem):
    gateway, b1, b2 = two_models
    assert_openai_error(post_form(gateway, raw, boundary), 400, problem)
    assert not b1.requests + b2.requests


@pytest.mark.parametrize("line_break", [b"\r\n", b"\n"])
def test_a_form_model_is_found_wherever_the_parsers_chunks_end(line_break):
    def form(file: bytes, model: bytes) -> bytes:
        head = b"--b" + line_break + b'Content-Disposition: form-data; name="%s"' + line_break + line_break
        return (head % b"file") + file + line_break + (head % b"model") + model + line_break + b"--b--" + line_break

    for size in range(llm_request.FORM_CHUNK - 200, llm_request.FORM_CHUNK + 10):  # every cut of the model part
        found = llm_request.parse_form(form(b"x" * size, b"llama3:8b"), "multipart/form-data; boundary=b")
        assert found.model == "llama3:8b", size  # was "llama3:8b\r" where a chunk ended inside the delimiter
        assert found.renamed("org/other:1") == form(b"x" * size, b"org/other:1")


def test_a_form_with_too_many_parts_before_its_model_is_refused(two_models):
    gateway, b1, b2 = two_models
    raw = multipart(*[(f"f{i}", b"x", None) for i in range(1001)], ("model", b"llama3:8b", None))
    assert_openai_error(post_form(gateway, raw), 400, "no 'model' field among its first 1000 parts")
    assert not b1.requests + b2.requests


def test_a_form_over_the_body_limit_is_413(live_gateway, fake_llm_servers):
    gateway = live_gateway(proxy_max_body_bytes=100_000)
    box = fake_llm_servers("B1", models=["whisper-1"])
    register(gateway, box, models=["whisper-1"])
    response = post_form(gateway, multipart(("model", b"whisper-1", None), ("file", AUDIO, "a.wav")))
    assert_openai_error(response, 413, "100000 bytes")
    assert not box.requests_to("/v1/audio/transcriptions")


# -- the fleet's Ollama: /api/ps and /api/version ----------------------------------------


def test_ps_is_the_union_of_the_healthy_servers_each_entry_naming_its_server(live_gateway, fake_llm_servers):
    gateway = live_gateway()
    b1 = fake_llm_servers("B1", models=["llama3:8b", "qwen2:7b"], loaded=["llama3:8b"])
    b2 = fake_llm_servers("B2", models=["qwen2:7b", "llama3:8b"], loaded=["qwen2:7b", "llama3:8b"])
    b3 = fake_llm_servers("B3", models=["mistral:7b"])
    for box in (b1, b2, b3):
        register(gateway, box)
    b3.healthy = False
    for _ in range(3):  # HEALTH_CHECK_FAILURES
        gateway.manager.run_health_sweep()
    b3.requests.clear()
    response = requests.get(gateway.url + "/api/ps", timeout=10)
    assert response.status_code == 200
    assert "X-Missing-Servers" not in response.headers
    running = response.json()["models"]
    assert [(entry["name"], entry["server"]) for entry in running] == [
        ("llama3:8b", "B1"),
        ("llama3:8b", "B2"),
        ("qwen2:7b", "B2"),
    ]
    assert {"model", "size", "digest", "details", "expires_at", "size_vram"} <= set(running[0])
    assert not b3.requests_to("/api/ps")  # an unhealthy server is not asked


def test_ps_leaves_out_a_server_that_hangs_or_is_dead_and_names_it(live_gateway, fake_llm_servers):
    gateway = live_gateway()  # HEALTH_CHECK_TIMEOUT=1: each server's deadline
    gate = threading.Event()
    b1 = fake_llm_servers("B1", models=["llama3:8b"])
    b2 = fake_llm_servers("B2", models=["qwen2:7b"], listing_gate=gate)
    b3 = fake_llm_servers("B3", models=["qwen2:7b"], listing_gate=gate)
    b4 = fake_llm_servers("B4", models=["phi3"])
    for box in (b1, b2, b3, b4):
        register(gateway, box)
    b4.stop()
    try:
        response = requests.get(gateway.url + "/api/ps", timeout=10)
    finally:
        gate.set()
    assert response.status_code == 200
    assert [(entry["name"], entry["server"]) for entry in response.json()["models"]] == [("llama3:8b", "B1")]
    assert response.headers["X-Missing-Servers"] == "B2, B3, B4"
    assert b2.requests_to("/api/ps") and b3.requests_to("/api/ps")  # both were asked within the one deadline


def test_ps_leaves_out_a_server_whose_answer_is_not_ollamas(live_gateway, fake_llm_servers, fake_servers):
    gateway = live_gateway()
    register(gateway, fake_llm_servers("B1", models=["llama3:8b"]))
    gateway.register(fake_servers("G1"))  # a GPU server of another kind: no /api/ps of Ollama's shape
    response = requests.get(gateway.url + "/api/ps", timeout=10)
    assert [entry["server"] for entry in response.json()["models"]] == ["B1"]
    assert response.headers["X-Missing-Servers"] == "G1"


def test_ps_without_servers_is_empty(live_gateway):
    response = requests.get(live_gateway().url + "/api/ps", timeout=5)
    assert response.status_code == 200
    assert response.json() == {"models": []}


def test_version_is_the_lowest_the_servers_report(live_gateway, fake_llm_servers):
    gateway = live_gateway()
    gate = threading.Event()
    versions = {"B1": "0.6.10", "B2": "0.6.5", "B3": "0.1.0"}
    for server_id, version in versions.items():
        box = fake_llm_servers(
            server_id, models=["m"], version=version, listing_gate=gate if server_id == "B3" else None
        )
        register(gateway, box)
    try:
        response = requests.get(gateway.url + "/api/version", timeout=10)
    finally:
        gate.set()
    assert response.status_code == 200
    assert response.json() == {"version": "0.6.5"}  # 0.6.10 is the later one; B3 did not answer in time
    assert response.headers["X-Missing-Servers"] == "B3"


def test_version_with_no_server_answering_is_503_in_ollamas_shape(live_gateway):
    response = requests.get(live_gateway().url + "/api/version", timeout=5)
    assert response.status_code == 503
    assert response.headers["Retry-After"]
    assert "no healthy Ollama server answered" in response.json()["error"]


def test_under_gunicorn_ps_asks_every_server_at_once_and_a_form_goes_byte_for_byte(gateway_process, fake_llm_servers):
    gateway = gateway_process(HEALTH_CHECK_TIMEOUT="1")
    gate = threading.Event()
    b1 = fake_llm_servers("B1", models=["whisper-1", "llama3:8b"], loaded=["llama3:8b"])
    b2 = fake_llm_servers("B2", models=["qwen2:7b"], listing_gate=gate)
    register(gateway, b1, models=["whisper-1", "llama3:8b"])
    register(gateway, b2, models=["qwen2:7b"])
    try:
        response = requests.get(gateway.url + "/api/ps", timeout=10)
    finally:
        gate.set()
    assert [(entry["name"], entry["server"]) for entry in response.json()["models"]] == [("llama3:8b", "B1")]
    assert response.headers["X-Missing-Servers"] == "B2"
    raw = multipart(("file", AUDIO, "a.wav"), ("model", b"whisper-1", None))
    response = post_form(gateway, raw)
    assert response.status_code == 200, response.text
    assert b1.requests_to("/v1/audio/transcriptions")[-1]["raw"] == raw
    assert requests.get(gateway.url + "/v1/models/llama3:8b", timeout=5).json()["id"] == "llama3:8b"
    assert requests.get(gateway.url + "/v1/nothing", timeout=5).json()["error"]["type"] == "invalid_request_error"
    assert "Traceback" not in gateway.log()
