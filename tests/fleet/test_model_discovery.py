"""Model discovery against real HTTP servers on 127.0.0.1: fake LLM servers and scripted ones."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from demo.fake_llm_server import FakeLLMServer
from gateway.fleet.model_discovery import MAX_LISTING_BYTES, MAX_MODELS, DiscoveryTarget, ModelDiscoverer, valid_names


class Scripted(ThreadingHTTPServer):
    """Answers each path as scripted: (status, body, seconds to wait before answering, drip)."""

    daemon_threads = True

    def __init__(self, script: dict[str, tuple[int, bytes, float, bool]]) -> None:
        super().__init__(("127.0.0.1", 0), ScriptedHandler)
        self.script = script
        self.hits: list[str] = []
        self.release = threading.Event()  # ends waits and drips early when the test is done

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class ScriptedHandler(BaseHTTPRequestHandler):
    server: Scripted
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        self.server.hits.append(self.path)
        status, body, delay, drip = self.server.script.get(self.path, (404, b"{}", 0.0, False))
        if delay:
            self.server.release.wait(delay)
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        if status in (301, 302, 307):
            self.send_header("Location", "/elsewhere")
        self.end_headers()
        try:
            if drip:  # one byte every 0.2 s: each read is quick, the whole answer is not
                for byte in body:
                    self.wfile.write(bytes([byte]))
                    self.wfile.flush()
                    if self.server.release.wait(0.2):
                        return
            else:
                self.wfile.write(body)
        except OSError:
            pass


@pytest.fixture
def scripted() -> Iterator:
    started: list[Scripted] = []

    def start(script: dict[str, tuple[int, bytes, float, bool]]) -> Scripted:
        server = Scripted(script)
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.release.set()
        server.shutdown()
        server.server_close()


@pytest.fixture
def discoverer() -> Iterator:
    made: list[ModelDiscoverer] = []

    def make(mode: str, timeout: float = 2.0) -> ModelDiscoverer:
        made.append(ModelDiscoverer(mode, timeout=timeout))
        return made[-1]

    yield make
    for item in made:
        item.close()


def discover(discoverer: ModelDiscoverer, *urls: str) -> dict[str, list[str]]:
    targets = [DiscoveryTarget(f"S{i}", url) for i, url in enumerate(urls)]
    return {server_id: names for server_id, _, names in discoverer.collect(discoverer.submit(targets))}


def ok(document: object) -> tuple[int, bytes, float, bool]:
    return 200, json.dumps(document).encode(), 0.0, False


def test_ollama_and_openai_fakes_in_every_mode(fake_llm_servers, discoverer):
    box = fake_llm_servers("B1", models=["llama3:8b", "qwen2:7b"])
    for mode in ("auto", "ollama", "openai"):
        assert discover(discoverer(mode), box.url) == {"S0": ["llama3:8b", "qwen2:7b"]}
    assert discover(discoverer("off"), box.url) == {}
    assert discoverer("off").submit([DiscoveryTarget("S0", box.url)]) == []


def test_collect_reports_the_url_asked(fake_llm_servers, discoverer):
    box = fake_llm_servers("B1", models=["m"])
    item = discoverer("ollama")
    assert item.collect(item.submit([DiscoveryTarget("B1", box.url)])) == [("B1", box.url, ["m"])]


def test_auto_falls_back_to_v1_models_for_a_vllm_server(scripted, discoverer):
    vllm = scripted({"/v1/models": ok({"object": "list", "data": [{"id": "meta-llama/Llama-3-8B"}]})})
    assert discover(discoverer("auto"), vllm.url) == {"S0": ["meta-llama/Llama-3-8B"]}
    assert vllm.hits == ["/api/tags", "/v1/models"]
    assert discover(discoverer("ollama"), vllm.url) == {}  # 404 on /api/tags: no usable answer


def test_auto_asks_once_when_api_tags_lists_models(scripted, discoverer):
    ollama = scripted({"/api/tags": ok({"models": [{"name": "a"}, {"model": "b"}, {"name": "", "model": "c"}]})})
    assert discover(discoverer("auto"), ollama.url) == {"S0": ["a", "b", "c"]}
    assert ollama.hits == ["/api/tags"]


def test_a_server_with_no_models_is_reported_empty(scripted, discoverer):
    empty = scripted({"/api/tags": ok({"models": []})})
    assert discover(discoverer("auto"), empty.url) == {"S0": []}  # /v1/models (404) was tried too
    assert empty.hits == ["/api/tags", "/v1/models"]


@pytest.mark.parametrize(
    "answer",
    [
        (200, b"{not json", 0.0, False),
        (200, b"[" * 100_000 + b"]" * 100_000, 0.0, False),  # deeper than json can parse
        ok(["a list, not an object"]),
        ok({"models": "not a list"}),
        ok({"data": []}),  # an OpenAI shape where Ollama's was asked for
        (500, b'{"models": [{"name": "a"}]}', 0.0, False),
        (302, b'{"models": [{"name": "a"}]}', 0.0, False),  # redirects are not followed
        (200, b'{"models": [' + b'{"name": "x"},' * (MAX_LISTING_BYTES // 13) + b"{}]}", 0.0, False),
    ],
    ids=["bad-json", "too-deep", "not-an-object", "not-a-list", "wrong-shape", "500", "redirect", "oversize"],
)
def test_unusable_answers_give_nothing_and_raise_nothing(scripted, discoverer, answer):
    server = scripted({"/api/tags": answer, "/elsewhere": ok({"models": [{"name": "a"}]})})
    assert discover(discoverer("ollama"), server.url) == {}
    assert "/elsewhere" not in server.hits


def test_unreachable_server_gives_nothing(discoverer, scripted):
    server = scripted({})
    url = server.url
    server.shutdown()
    server.server_close()
    assert discover(discoverer("auto"), url) == {}


@pytest.mark.parametrize("drip", [False, True], ids=["silent", "dripping"])
def test_a_slow_server_is_given_up_on_and_does_not_hold_the_others(scripted, discoverer, drip):
    slow = scripted({"/api/tags": (200, json.dumps({"models": [{"name": "a"}]}).encode(), 0.0 if drip else 30, drip)})
    fast = scripted({"/api/tags": ok({"models": [{"name": "b"}]})})
    started = time.monotonic()
    assert discover(discoverer("ollama", timeout=0.5), slow.url, fast.url) == {"S1": ["b"]}
    assert time.monotonic() - started < 10  # a generous bound: far below the slow server's 30 s


def test_names_are_validated_deduplicated_and_capped():
    long_name = "x" * 200
    candidates = [
        "ok:1",
        "ok:1",
        "",
        " lead",
        "has space",
        "tab\t",
        "nl\n",
        "\x00nul",
        long_name,
        long_name + "y",
        7,
        None,
    ]
    assert valid_names(candidates) == ["ok:1", long_name]
    assert len(valid_names(f"m{i}" for i in range(5000))) == MAX_MODELS


def test_openai_listing_names_are_validated(scripted, discoverer):
    server = scripted({"/v1/models": ok({"data": [{"id": "good"}, {"id": "bad name"}, {"id": 3}, "junk", {}]})})
    assert discover(discoverer("openai"), server.url) == {"S0": ["good"]}


def test_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="auto, ollama, openai, off"):
        ModelDiscoverer("llamacpp")


def test_submit_after_close_gives_nothing(discoverer, fake_llm_servers):
    box: FakeLLMServer = fake_llm_servers("B1")
    item = discoverer("auto")
    item.close()
    assert item.submit([DiscoveryTarget("B1", box.url)]) == []
