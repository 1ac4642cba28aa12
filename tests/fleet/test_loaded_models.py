"""What Ollama servers have in memory: the sweep's GET /api/ps, kept on the record, written only when it changes."""

from __future__ import annotations

import itertools
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from conftest import wait_until

from gateway.fleet import registry
from gateway.fleet.model_discovery import DiscoveryTarget, ModelDiscoverer, ollama_loaded
from gateway.fleet.model_memory import LoadedModel
from gateway.fleet.server import BackendServer

GIB = 1024**3


@pytest.fixture
def discoverer():
    made: list[ModelDiscoverer] = []

    def make(mode: str) -> ModelDiscoverer:
        made.append(ModelDiscoverer(mode, timeout=2.0))
        return made[-1]

    yield make
    for item in made:
        item.close()


def read_loaded(discoverer: ModelDiscoverer, *urls: str) -> list:
    targets = [DiscoveryTarget(f"S{i}", url) for i, url in enumerate(urls)]
    return discoverer.collect_loaded(discoverer.submit_loaded(targets))


class NotOllama(ThreadingHTTPServer):
    """A vLLM-like box: 404 for everything but /v1/models."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), NotOllamaHandler)
        self.hits: list[str] = []
        threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class NotOllamaHandler(BaseHTTPRequestHandler):
    server: NotOllama
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        self.server.hits.append(self.path)
        self.send_response(404)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")


def test_api_ps_names_the_models_in_memory_and_their_vram(fake_llm_servers, discoverer):
    box = fake_llm_servers("B1", models=["a:1", "b:2"], loaded=["b:2"], vram={"b:2": 5 * GIB})
    for mode in ("auto", "ollama"):
        assert read_loaded(discoverer(mode), box.url) == [("S0", box.url, [("b:2", 5 * GIB)])]


@pytest.mark.parametrize("mode", ["openai", "off"])
def test_modes_that_do_not_read_ollama_ask_nothing(fake_llm_servers, discoverer, mode):
    box = fake_llm_servers("B1", models=["a:1"])
    assert read_loaded(discoverer(mode), box.url) == []
    assert box.requests_to("/api/ps") == []


def test_a_server_that_is_not_ollama_gives_no_answer(discoverer):
    vllm = NotOllama()
    try:
        assert read_loaded(discoverer("auto"), vllm.url) == [("S0", vllm.url, None)]
        assert vllm.hits == ["/api/ps"]
    finally:
        vllm.shutdown()
        vllm.server_close()


def test_a_question_that_has_not_ended_by_the_deadline_is_left_out(fake_llm_servers):
    hung = fake_llm_servers("B1", models=["a:1"], listing_gate=threading.Event())  # /api/ps never answers
    one_at_a_time = ModelDiscoverer("auto", timeout=0.5, concurrency=1)
    try:
        targets = [DiscoveryTarget(f"S{i}", hung.url) for i in range(3)]
        found = one_at_a_time.collect_loaded(one_at_a_time.submit_loaded(targets))
    finally:
        one_at_a_time.close()
    # S0 gave up after its timeout (nothing known loaded); S2 was still waiting for the one thread.
    assert found[0] == ("S0", hung.url, None)
    assert "S2" not in [server_id for server_id, _, _ in found]


@pytest.mark.parametrize(
    ("document", "expected"),
    [
        ({"models": []}, []),
        ({"models": [{"name": "a", "size_vram": 7}, {"model": "b", "size_vram": 0}]}, [("a", 7), ("b", 0)]),
        ({"models": [{"name": "a", "size_vram": -1}, {"name": "c", "size_vram": True}]}, [("a", 0), ("c", 0)]),
        ({"models": [{"name": "a"}, {"name": "a", "size_vram": 9}]}, [("a", 0)]),
        ({"models": [{"name": "bad name"}, {"name": ""}, "junk", {"size_vram": 3}]}, []),
        ({"models": "not a list"}, None),
        (["not", "an", "object"], None),
    ],
)
def test_ps_answers_are_read_strictly(document, expected):
    assert ollama_loaded(document) == expected


def sweep_app(make_app, box):
    app = make_app()
    manager = app.extensions["backend_manager"]
    manager.register("B1", "127.0.0.1", box.port, options={"models": box.models}, check=False)
    return manager


def test_the_sweep_keeps_them_on_the_record_and_writes_only_a_change(make_app, fake_llm_servers, monkeypatch):
    clock = itertools.count()
    monkeypatch.setattr(registry, "now_iso", lambda: f"2025-01-01T00:00:{next(clock):02d}+00:00")  # a new time a sweep
    box = fake_llm_servers("B1", models=["a:1", "b:2"], loaded=["a:1"], vram={"a:1": 3 * GIB})
    manager = sweep_app(make_app, box)

    manager.run_health_sweep()
    (first,) = manager.get_server("B1").loaded_models
    assert (first.name, first.size_vram) == ("a:1", 3 * GIB) and first.read_at
    version = manager.registry.version
    manager.run_health_sweep()
    assert manager.registry.version == version  # the same answer: nothing changed, nothing written
    assert manager.get_server("B1").loaded_models == [first]

    box.loaded = ["a:1", "b:2"]
    manager.run_health_sweep()

    assert [m.name for m in manager.get_server("B1").loaded_models] == ["a:1", "b:2"]
    assert manager.get_server("B1").loaded_models[0] == first  # still loaded: its entry and time kept
    assert manager.registry.version > version
    (entry,) = manager.store.load()
    assert [m["name"] for m in entry["loaded_models"]] == ["a:1", "b:2"]  # saved, as discovered models are
    assert [m["name"] for m in manager.describe_server("B1")["loaded_models"]] == ["a:1", "b:2"]


def test_a_server_that_stops_answering_has_nothing_known_loaded(make_app, fake_llm_servers):
    box = fake_llm_servers("B1", models=["a:1"])
    manager = sweep_app(make_app, box)
    manager.run_health_sweep()
    assert manager.get_server("B1").loaded_models

    box.stop()
    manager.run_health_sweep()

    assert manager.get_server("B1").loaded_models == []


def test_a_server_with_no_models_known_is_not_asked(make_app, fake_llm_servers):
    box = fake_llm_servers("B1", models=[])
    app = make_app(model_discovery="off")
    app.extensions["backend_manager"].register("B1", "127.0.0.1", box.port, check=False)

    app.extensions["backend_manager"].run_health_sweep()

    assert box.requests_to("/api/ps") == []


def test_the_record_keeps_them_through_the_state_file_and_drops_bad_entries():
    server = BackendServer("B1", "127.0.0.1", 8000, loaded_models=[LoadedModel("a:1", 5, "2025-01-01T00:00:00+00:00")])
    entry = server.to_entry()
    assert entry["loaded_models"] == [{"name": "a:1", "size_vram": 5, "read_at": "2025-01-01T00:00:00+00:00"}]
    assert BackendServer.from_dict(entry).loaded_models == server.loaded_models

    entry["loaded_models"] += [{"name": "x y", "size_vram": 1}, {"name": "b", "size_vram": "1"}, 7]
    assert BackendServer.from_dict(entry).loaded_models == server.loaded_models


def test_a_move_forgets_what_the_old_address_had_loaded(make_app, fake_llm_servers):
    box = fake_llm_servers("B1", models=["a:1"])
    manager = sweep_app(make_app, box)
    manager.run_health_sweep()

    manager.register("B1", "127.0.0.1", box.port + 1, options={"models": box.models}, check=False)

    assert manager.get_server("B1").loaded_models == []


def test_loaded_models_reach_every_gateway_on_redis(make_app, redis_server, fake_llm_servers):
    box = fake_llm_servers("B1", models=["a:1"], loaded=["a:1"])
    a, b = (make_app(redis_url=redis_server.url, redis_timeout=0.5) for _ in range(2))
    managers = [app.extensions["backend_manager"] for app in (a, b)]
    managers[0].register("B1", "127.0.0.1", box.port, options={"models": ["a:1"]}, check=False)
    leader, other = managers if managers[0].health_job.leader.is_leader else managers[::-1]
    assert wait_until(lambda: other.get_server("B1") is not None, timeout=2)

    leader.run_health_sweep()

    assert wait_until(lambda: [m.name for m in other.get_server("B1").loaded_models] == ["a:1"], timeout=2)
    assert json.loads(json.dumps(other.describe_server("B1")["loaded_models"]))[0]["name"] == "a:1"
