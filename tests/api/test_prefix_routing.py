"""ROUTING_POLICY=prefix over real HTTP: a live gateway in front of fake LLM boxes with their simulated caches."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import pytest
import requests
from conftest import SECRET, wait_until
from prometheus_client.parser import text_string_to_metric_families

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


def settled(gateway) -> None:
    """Wait until no request holds a slot at the gateway.

    The slot is freed just after the client has the last byte: a turn sent at once could find its
    own server still holding the one before, and over the load bound.
    """
    manager = gateway.manager

    def free() -> bool:
        with manager._lock:  # the slots are counted under the fleet's lock
            return not manager.admission.in_flight

    assert wait_until(free)


def sent(conversation: Conversation, gateway) -> str:
    """The server that answered the conversation's next turn, once its slot is free again."""
    server = served_by(conversation.send(gateway))
    settled(gateway)
    return server


def test_the_turns_of_one_conversation_land_on_one_box_whose_cache_they_hit(live_gateway, fake_llm_servers):
    gateway, boxes = start_fleet(live_gateway, fake_llm_servers)
    conversations = [Conversation(n, ollama=n == 4) for n in range(5)]
    homes = {}
    for turn in range(4):
        for n, conversation in enumerate(conversations):
            response = conversation.send(gateway)
            settled(gateway)
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
    assert prefix_results(gateway) == counted()  # no prefix choice was made


@pytest.mark.parametrize("leave", ["unregistered", "killed"])
def test_a_box_that_leaves_hands_its_conversations_to_the_others(live_gateway, fake_llm_servers, leave):
    gateway, boxes = start_fleet(live_gateway, fake_llm_servers)
    conversations = [Conversation(n) for n in range(6)]
    homes = {n: sent(c, gateway) for n, c in enumerate(conversations)}
    assert sorted(homes.values()) == ["B1", "B1", "B2", "B2", "B3", "B3"]
    if leave == "unregistered":
        body = {"server_id": "B1", "secret": SECRET}
        assert requests.post(gateway.url + "/webhook/unregister", json=body, timeout=5).status_code == 200
    else:
        boxes[0].stop()  # the gateway finds out when it connects, and tries another
    moved = {n: sent(c, gateway) for n, c in enumerate(conversations)}
    assert "B1" not in moved.values()
    assert all(moved[n] == homes[n] for n in homes if homes[n] != "B1")
    for _ in range(2):  # B1's conversations stay where they went
        assert {n: sent(c, gateway) for n, c in enumerate(conversations)} == moved


# -- gateway_prefix_routing_total --------------------------------------------------------------


def prefix_results(gateway) -> dict[str, float]:
    """gateway_prefix_routing_total by result, as a scrape of /metrics shows it."""
    text = requests.get(gateway.url + "/metrics", timeout=5).text
    return {
        sample.labels["result"]: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "gateway_prefix_routing_total"
    }


def counted(**results: float) -> dict[str, float]:
    return {"hit": 0.0, "overloaded": 0.0, "unavailable": 0.0, "miss": 0.0, **results}


def test_hits_misses_and_servers_passed_over_are_counted(live_gateway, fake_llm_servers):
    gateway, _ = start_fleet(live_gateway, fake_llm_servers)
    assert prefix_results(gateway) == counted()  # each result at 0 before the first request
    conversations = [Conversation(n) for n in range(3)]
    homes = [sent(c, gateway) for c in conversations]  # new: no block known
    assert prefix_results(gateway) == counted(miss=3)
    assert [sent(c, gateway) for c in conversations] == homes
    assert prefix_results(gateway) == counted(hit=3, miss=3)
    body = {"server_id": homes[0], "secret": SECRET}
    assert requests.post(gateway.url + "/webhook/unregister", json=body, timeout=5).status_code == 200
    moved = sent(conversations[0], gateway)  # its prefix is known, but only its server, gone, held it
    assert sent(conversations[0], gateway) == moved  # where it went holds it now
    assert prefix_results(gateway) == counted(hit=4, unavailable=1, miss=3)


def start_gated_fleet(live_gateway, fake_llm_servers, gate: threading.Event, **config: object):
    """A prefix-routing gateway over 3 boxes whose streams wait at `gate` after their first chunk."""
    gateway = live_gateway(routing_policy="prefix", **config)
    for n in (1, 2, 3):
        box = fake_llm_servers(f"B{n}", models=[MODEL], gate=gate)
        body = {"server_id": box.server_id, "ip": "127.0.0.1", "port": box.port, "secret": SECRET, "models": [MODEL]}
        assert requests.post(gateway.url + "/webhook/register", json=body, timeout=5).status_code in (200, 201)
    return gateway


@contextlib.contextmanager
def held_open(conversation: Conversation, gateway) -> Iterator[requests.Response]:
    """A streamed request on the conversation's prefix, past its first chunk: it holds a slot until the gate opens."""
    body = {"model": MODEL, "messages": [*conversation.messages, {"role": "user", "content": "go on"}], "stream": True}
    with requests.post(gateway.url + "/v1/chat/completions", json=body, stream=True, timeout=10) as held:
        next(held.iter_content(chunk_size=None))
        yield held


def test_a_match_over_its_load_bound_is_counted_as_overloaded(live_gateway, fake_llm_servers):
    gate = threading.Event()
    gateway = start_gated_fleet(live_gateway, fake_llm_servers, gate, prefix_load_slack=0)  # the bound alone
    conversation = Conversation(0)
    home = sent(conversation, gateway)
    with held_open(conversation, gateway) as held:
        assert served_by(held) == home  # a hit, held open on its home: 1 in flight there, 0 elsewhere
        # This one counts too: 2 in flight over 3 servers, a cap of ceil(1.25 x 2 / 3) = 1, which home has.
        assert served_by(conversation.send(gateway)) != home
        gate.set()
    assert prefix_results(gateway) == counted(hit=1, overloaded=1, miss=1)


def test_within_the_load_slack_a_turn_stays_home_while_its_box_serves_another(live_gateway, fake_llm_servers):
    gate = threading.Event()
    gateway = start_gated_fleet(live_gateway, fake_llm_servers, gate)  # PREFIX_LOAD_SLACK's default, 4
    conversation = Conversation(0)
    home = sent(conversation, gateway)
    with held_open(conversation, gateway) as held:
        assert served_by(held) == home
        # Over the bound (a cap of 1, as above) but under the slack: home may take a second.
        response = conversation.send(gateway)
        assert served_by(response) == home
        assert int(response.headers["X-Cache-Hit-Blocks"]) > 0  # its start found warm
        gate.set()
    assert prefix_results(gateway) == counted(hit=2, miss=1)


def test_requests_not_routed_by_prefix_are_not_counted(live_gateway, fake_llm_servers):
    gateway, _ = start_fleet(live_gateway, fake_llm_servers)
    keyed = {"model": MODEL, "messages": Conversation(1).messages, "user": "user-7", "stream": False}
    assert requests.post(gateway.url + "/v1/chat/completions", json=keyed, timeout=10).status_code == 200  # sticky
    embed = {"model": MODEL, "input": "You are the assistant. " * 40}
    assert requests.post(gateway.url + "/v1/embeddings", json=embed, timeout=10).status_code == 200  # no prompt
    assert prefix_results(gateway) == counted()
