"""The fake LLM box's simulated prefix cache (demo/prompt_cache.py): hits, its bound, its header and /_stats."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import pytest
import requests

from demo import prompt_cache
from demo.prompt_cache import PromptCache

SYSTEM = {"role": "system", "content": "You answer questions about the gateway. " * 20}  # 820 characters


def chat(*contents: str) -> dict:
    roles = ["user", "assistant"] * len(contents)
    return {
        "model": "m",
        "messages": [SYSTEM, *({"role": r, "content": c} for r, c in zip(roles, contents, strict=False))],
    }


def test_a_prompt_seen_before_hits_every_block_and_a_longer_one_its_start():
    cache = PromptCache(block_chars=64)
    first = cache.serve("m", chat("q1 " * 50))
    assert (first.hit_blocks, first.blocks) == (0, 15)
    again = cache.serve("m", chat("q1 " * 50))
    assert again.hit_blocks == again.blocks == 15
    longer = cache.serve("m", chat("q1 " * 50, "a1 " * 50, "q2 " * 50))
    assert longer.hit_blocks == 15 and longer.blocks > 15
    other_model = cache.serve("other", chat("q1 " * 50))
    assert other_model.hit_blocks == 0
    stats = cache.stats()
    assert (stats["requests"], stats["requests_with_hits"]) == (4, 2)
    assert stats["hit_blocks"] == 30 and stats["hit_rate"] == pytest.approx(
        30 / (15 + 15 + longer.blocks + 15), abs=1e-4
    )


def test_a_change_early_in_the_prompt_misses_from_there_on():
    cache = PromptCache(block_chars=64)
    cache.serve("m", {"prompt": "x" * 640})
    assert cache.serve("m", {"prompt": "x" * 200 + "y" + "x" * 439}).hit_blocks == 3


def test_the_cache_keeps_at_most_its_capacity_least_recent_dropped():
    cache = PromptCache(block_chars=64, capacity=20)
    cache.serve("m", {"prompt": "a" * 64 * 10})
    cache.serve("m", {"prompt": "b" * 64 * 15})
    assert cache.stats()["cached_blocks"] == 20
    assert cache.serve("m", {"prompt": "a" * 64 * 10}).hit_blocks == 0  # its first blocks went first
    assert cache.serve("m", {"prompt": "b" * 64 * 15}).hit_blocks == 0  # and then b's, to make room again


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/api/chat"])
def test_a_box_says_its_hits_in_a_header_and_counts_them_in_stats(fake_llm_servers, path):
    box = fake_llm_servers("B1", models=["m"])
    body = {**chat("question " * 40), "stream": False}
    first = requests.post(box.url + path, json=body, timeout=5)
    second = requests.post(box.url + path, json={**body, "stream": True}, timeout=5)
    assert (first.headers["X-Cache-Hit-Blocks"], second.headers["X-Cache-Hit-Blocks"]) == ("0", "4")
    stats = requests.get(box.url + "/_stats", timeout=5).json()
    assert (stats["server_id"], stats["requests"], stats["hit_blocks"], stats["miss_blocks"]) == ("B1", 2, 4, 4)
    assert "X-Cache-Hit-Blocks" not in requests.get(box.url + "/health", timeout=5).headers


def test_a_cold_block_costs_cold_ms_per_block_and_a_cached_one_nothing(fake_llm_servers, monkeypatch):
    slept: list[float] = []
    clock = SimpleNamespace(sleep=slept.append)
    monkeypatch.setattr(prompt_cache, "time", clock)
    box = fake_llm_servers("B1", models=["m"], cold_ms_per_block=5.0)
    body = {"model": "m", "prompt": "p" * 256 * 6, "stream": False}  # 6 blocks, and the end-of-prompt mark
    requests.post(box.url + "/v1/completions", json=body, timeout=5)
    requests.post(box.url + "/v1/completions", json=body, timeout=5)
    requests.post(box.url + "/v1/completions", json={**body, "prompt": "p" * 256 * 8}, timeout=5)
    assert slept == [pytest.approx(0.030), pytest.approx(0.010)]  # 6 cold, then none, then the 2 new


def test_with_no_cold_cost_a_box_never_waits(fake_llm_servers, monkeypatch):
    slept: list[float] = []
    monkeypatch.setattr(prompt_cache, "time", SimpleNamespace(sleep=slept.append))
    box = fake_llm_servers("B1", models=["m"])
    requests.post(box.url + "/api/generate", json={"model": "m", "prompt": "p" * 2000, "stream": False}, timeout=5)
    assert slept == []


def test_with_prefill_slots_cold_prefills_queue_for_them(fake_llm_servers):
    box = fake_llm_servers("B1", models=["m"], cold_ms_per_block=1.0, prefill_slots=1)
    slots = box.prefill.slots
    assert slots is not None
    slots.acquire()  # the box's one slot, busy
    answered = threading.Event()

    def send() -> None:
        requests.post(box.url + "/v1/completions", json={"model": "m", "prompt": "p" * 600}, timeout=10)
        answered.set()

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    try:
        assert not answered.wait(0.3)  # its 2 cold blocks wait for the slot
    finally:
        slots.release()
    assert answered.wait(10)
    sender.join(10)
