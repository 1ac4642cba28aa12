"""ROUTING_POLICY=prefix over real HTTP: a live gateway in front of fake LLM boxes with their simulated caches."""

from __future__ import annotations

import pytest
import requests
from conftest import SECRET

MODEL = "llama3:8b"


class Conversation:
    """A chat that grows a turn at a time, each answer appended as a client does."""

    def __init__(self, number: int, ollama: bool = False) -> None:
        self.ollama = ollama
        system = f"You are the assistant of conversation {number}; answer with care. " * 12
        self.messages = [{"role": "system", "content": system}]
        self.turns = 0

    def send(self, gateway) -> requests.Response:
        self.turns += 1
        self.messages.append({"role": "user", "content": f"Question {self.turns}: tell me more. " * 6})
        path = "/api/chat" if self.ollama else "/v1/chat/completions"
        body = {"model": MODEL, "messages": self.messages, "stream": False}
        response = requests.post(gateway.url + path, json=body, timeout=10)
        assert response.status_code == 200, response.text
        answer = response.json()
        text = answer["message"]["content"] if self.ollama else answer["choices"][0]["message"]["content"]
        self.messages.append({"role": "assistant", "content": text})
        return response


def start_fleet(live_gateway, fake_llm_servers, policy: str = "prefix"):
    gateway = live_gateway(routing_policy=policy)
    boxes = [fake_llm_servers(f"B{n}", models=[MODEL]) for n in (1, 2, 3)]
    for box in boxes:
        body = {"server_id": box.server_id, "ip": "127.0.0.1", "port": box.port, "secret": SECRET, "models": [MODEL]}
        assert requests.post(gateway.url + "/webhook/register", json=body, timeout=5).status_code in (200, 201)
    return gateway, boxes


def served_by(response: requests.Response) -> str:
    return response.headers["X-Backend-Server"]


def test_the_turns_of_one_conversation_land_on_one_box_whose_cache_they_hit(live_gateway, fake_llm_servers):
    gateway, boxes = start_fleet(live_gateway, fake_llm_servers)
    conversations = [Conversation(n, ollama=n == 4) for n in range(5)]
    homes = {}
    for turn in range(4):
        for n, conversation in enumerate(conversations):
            response = conversation.send(gateway)
            assert homes.setdefault(n, served_by(response)) == served_by(response), f"{n} moved at turn {turn}"
            hits = int(response.headers["X-Cache-Hit-Blocks"])
            assert (hits == 0) if turn == 0 else (hits > 0)  # from the second turn on, its start is cached
    assert len(set(homes.values())) == 3  # new conversations were spread
    stats = [requests.get(box.url + "/_stats", timeout=5).json() for box in boxes]
    assert sum(s["requests_with_hits"] for s in stats) == 5 * 3


def test_under_round_robin_the_turns_of_one_conversation_spread(live_gateway, fake_llm_servers):
    gateway, _ = start_fleet(live_gateway, fake_llm_servers, policy="round_robin")
    conversation = Conversation(0)
    assert len({served_by(conversation.send(gateway)) for _ in range(6)}) == 3


@pytest.mark.parametrize("leave", ["unregistered", "killed"])
def test_a_box_that_leaves_hands_its_conversations_to_the_others(live_gateway, fake_llm_servers, leave):
    gateway, boxes = start_fleet(live_gateway, fake_llm_servers)
    conversations = [Conversation(n) for n in range(6)]
    homes = {n: served_by(c.send(gateway)) for n, c in enumerate(conversations)}
    assert sorted(homes.values()) == ["B1", "B1", "B2", "B2", "B3", "B3"]
    if leave == "unregistered":
        body = {"server_id": "B1", "secret": SECRET}
        assert requests.post(gateway.url + "/webhook/unregister", json=body, timeout=5).status_code == 200
    else:
        boxes[0].stop()  # the gateway finds out when it connects, and tries another
    moved = {n: served_by(c.send(gateway)) for n, c in enumerate(conversations)}
    assert "B1" not in moved.values()
    assert all(moved[n] == homes[n] for n in homes if homes[n] != "B1")
    for _ in range(2):  # B1's conversations stay where they went
        assert {n: served_by(c.send(gateway)) for n, c in enumerate(conversations)} == moved
