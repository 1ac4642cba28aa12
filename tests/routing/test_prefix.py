"""Prefix-aware routing, pure: the prompt's chained block hashes, the table of who served them, the load bound."""

import pytest

from gateway.routing.policies import Candidate
from gateway.routing.prefix import (
    HIT,
    MISS,
    OVERLOADED,
    UNAVAILABLE,
    PrefixTable,
    load_cap,
    prefix_hashes,
    prompt_text,
)

BLOCK = 16


def chat(*contents: str, system: str = "S" * 40) -> dict:
    """A chat body: a system prompt, then user and assistant turns in order."""
    roles = ["user", "assistant"] * len(contents)
    messages = [{"role": "system", "content": system}]
    messages += [{"role": role, "content": text} for role, text in zip(roles, contents, strict=False)]
    return {"model": "llama3:8b", "messages": messages}


def hashes(body: dict, model: str = "llama3:8b", max_blocks: int = 32) -> tuple[int, ...]:
    return prefix_hashes(model, body, BLOCK, max_blocks)


# -- the hashes --------------------------------------------------------------------------------


def test_the_same_prompt_gives_the_same_chain():
    assert hashes(chat("hello there, " * 5)) == hashes(chat("hello there, " * 5))
    assert len(set(hashes(chat("hello there, " * 5)))) == len(prompt_text(chat("hello there, " * 5), 10**6)) // BLOCK


@pytest.mark.parametrize("k", [0, 3, 11])
def test_a_change_in_block_k_changes_that_block_and_every_later_one_only(k):
    prompt = ["a"] * 200
    first = hashes({"prompt": "".join(prompt)})
    prompt[k * BLOCK + 3] = "b"
    changed = hashes({"prompt": "".join(prompt)})
    assert len(first) == len(changed) == 12
    assert first[:k] == changed[:k]
    assert all(x != y for x, y in zip(first[k:], changed[k:], strict=True))


def test_a_conversation_that_grows_keeps_its_earlier_blocks():
    turn_one = hashes(chat("question one " * 10))
    turn_two = hashes(chat("question one " * 10, "answer one " * 10, "question two " * 10))
    assert len(turn_two) > len(turn_one)
    assert turn_two[: len(turn_one)] == turn_one


def test_the_blocks_are_bounded_and_only_full_ones_count():
    assert len(hashes(chat("x" * 100_000), max_blocks=32)) == 32
    assert len(hashes(chat("x" * 100_000), max_blocks=4)) == 4
    short = {"messages": [{"role": "user", "content": "hi"}]}
    assert hashes(short) == ()  # under one block: nothing to match
    exactly = len(prompt_text(chat("y" * 100), 10**6))
    assert len(hashes(chat("y" * 100))) == exactly // BLOCK


def test_the_model_and_the_roles_are_part_of_the_chain():
    body = chat("same words " * 10)
    assert hashes(body, model="llama3:8b")[0] != hashes(body, model="qwen2:7b")[0]
    assert hashes(body, model="llama3") == hashes(body, model="llama3:latest")  # matched as models are
    swapped = {"messages": [{**m, "role": "user"} for m in body["messages"]]}
    assert hashes(swapped)[0] != hashes(body)[0]


def test_a_prompt_and_ollamas_system_are_hashed_too():
    generate = {"system": "be brief " * 5, "prompt": "tell me " * 20}
    assert len(hashes(generate)) >= 9
    assert hashes(generate) != hashes({"prompt": "tell me " * 20})
    assert hashes({"prompt": list(range(200))})  # token ids, as OpenAI's completions take them


def test_content_parts_odd_values_and_deep_nesting_are_rendered_without_failing():
    parts = {"messages": [{"role": "user", "content": [{"type": "text", "text": "look " * 20}, {"type": "image_url"}]}]}
    assert hashes(parts)
    deep: object = "bottom"
    for _ in range(500):
        deep = [deep]
    assert prompt_text({"messages": [{"role": "user", "content": deep}]}, 1000).startswith("user")
    odd = {"messages": ["not an object", {"role": None, "content": 12}, {"content": "\ud800" * 40}]}
    assert hashes(odd)  # a lone surrogate, as JSON's "\ud800" gives, is hashed as it came


def test_a_huge_content_is_read_only_as_far_as_the_bound():
    body = {"messages": [{"role": "user", "content": "z" * 10_000_000}, {"role": "user", "content": "later"}]}
    assert len(prompt_text(body, 512)) == 512


# -- the load bound ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("weight", "total", "weights", "bound", "cap"),
    [
        (1, 1, 3, 1.25, 1),  # nothing in flight: each may take this one
        (1, 12, 3, 1.25, 5),  # 1.25 x 4 = 5 exactly, not 6 for float noise
        (1, 21, 3, 1.25, 9),  # 20 in flight over 3, plus this one
        (1, 21, 3, 1.0, 7),
        (2, 12, 4, 1.25, 8),  # a weight of 2 in 4: half the load
        (1, 7, 2, 2.0, 7),
    ],
)
def test_the_load_cap_is_ceil_of_c_times_the_weighted_average(weight, total, weights, bound, cap):
    assert load_cap(weight, total, weights, bound) == cap


@pytest.mark.parametrize(
    ("weight", "total", "weights", "slack", "cap"),
    [
        (1, 2, 3, 4, 4),  # 1 in flight over 3, plus this one: the bound's 1 is lifted to the slack
        (1, 2, 3, 0, 1),  # no slack: the bound alone
        (1, 12, 3, 4, 5),  # the bound above the slack is kept
        (1, 21, 3, 4, 9),
        (2, 12, 4, 10, 10),
    ],
)
def test_the_load_cap_is_at_least_the_slack(weight, total, weights, slack, cap):
    assert load_cap(weight, total, weights, 1.25, slack) == cap


# -- the table ---------------------------------------------------------------------------------


def idle(*ids: str, loads: dict | None = None) -> list[Candidate]:
    return [Candidate(server_id, 1.0, (loads or {}).get(server_id, 0)) for server_id in ids]


def chosen(table: PrefixTable, chain, candidates) -> list[str]:
    return [c.server_id for c in table.choose(chain, candidates)]


def test_the_longest_match_wins():
    table = PrefixTable()
    long = hashes(chat("alpha " * 40))
    table.record(long[:3], "B1")  # B1 served the start
    table.record(long, "B2")  # B2 served the whole of it, and the start since
    table.record(long[:3], "B3")
    assert chosen(table, long, idle("B1", "B2", "B3")) == ["B2"]
    assert chosen(table, long[:3], idle("B1", "B2", "B3")) == ["B3", "B2", "B1"]  # held by all: most recent first
    assert chosen(table, hashes(chat("other " * 40, system="T" * 40)), idle("B1", "B2", "B3")) == []


def test_over_its_load_bound_the_longest_match_gives_way_to_a_shorter_one_or_to_none():
    table = PrefixTable(load_bound=1.25, load_slack=0)
    long = hashes(chat("beta " * 40))
    table.record(long[:2], "B3")
    table.record(long, "B1")
    # 6 in flight over 3 plus this one: cap ceil(1.25 x 7 / 3) = 3; B1 holds 3.
    assert chosen(table, long, idle("B1", "B2", "B3", loads={"B1": 3, "B2": 2, "B3": 1})) == ["B3"]
    assert chosen(table, long, idle("B1", "B2", "B3", loads={"B1": 3, "B2": 0, "B3": 3})) == []
    assert chosen(table, long, idle("B1", "B2", "B3", loads={"B1": 2, "B2": 2, "B3": 2})) == ["B1"]


def test_a_server_that_is_no_candidate_is_passed_over():
    table = PrefixTable()
    long = hashes(chat("gamma " * 40))
    table.record(long, "B1")
    assert chosen(table, long, idle("B2", "B3")) == []  # left, unhealthy, draining, ejected, capped or other tier
    table.record(long[:4], "B2")
    assert chosen(table, long, idle("B2", "B3")) == ["B2"]


def test_a_match_says_how_it_went():
    table = PrefixTable(load_bound=1.25, load_slack=0)
    long = hashes(chat("delta " * 40))
    assert table.match(long, idle("B1", "B2", "B3")) == ([], MISS)
    table.record(long[:2], "B3")
    table.record(long, "B1")
    loads = {"B1": 3, "B2": 2, "B3": 1}  # cap 3 (as above): B1 is over it, B3, with the shorter prefix, is not
    holders, result = table.match(long, idle("B1", "B2", "B3", loads=loads))
    assert ([c.server_id for c in holders], result) == (["B3"], HIT)
    assert table.match(long, idle("B1", "B2", "B3", loads={"B1": 3, "B2": 0, "B3": 3})) == ([], OVERLOADED)
    assert table.match(long, idle("B2")) == ([], UNAVAILABLE)  # B1 and B3 left, or are down, drained, capped
    # One holder over its bound and another not a candidate: the load is why it fell back.
    assert table.match(long, idle("B1", "B2", loads={"B1": 5, "B2": 0})) == ([], OVERLOADED)


def test_under_the_slack_a_holder_over_its_bound_keeps_its_prefix():
    long = hashes(chat("epsilon " * 40))
    light = idle("B1", "B2", "B3", loads={"B1": 1})  # 2 in flight, this one included: the bound's cap is 1
    table = PrefixTable()
    table.record(long, "B1")
    assert table.load_slack == 4
    holders, result = table.match(long, light)
    assert ([c.server_id for c in holders], result) == (["B1"], HIT)
    pure = PrefixTable(load_slack=0)
    pure.record(long, "B1")
    assert pure.match(long, light) == ([], OVERLOADED)


def test_at_the_slack_and_over_its_bound_a_holder_is_overloaded():
    table = PrefixTable(load_bound=1.25, load_slack=4)
    long = hashes(chat("zeta " * 40))
    table.record(long, "B1")
    # 3 in flight on B1 and none elsewhere: the bound's cap is ceil(1.25 x 4 / 3) = 2, the slack's 4.
    assert chosen(table, long, idle("B1", "B2", "B3", loads={"B1": 3})) == ["B1"]
    # 4 in flight: the bound's cap is ceil(1.25 x 5 / 3) = 3, so B1 is at the slack and over the bound.
    assert table.match(long, idle("B1", "B2", "B3", loads={"B1": 4})) == ([], OVERLOADED)
    # With the others as busy, the bound rises past the slack and takes over: ceil(1.25 x 13 / 3) = 6.
    assert chosen(table, long, idle("B1", "B2", "B3", loads={"B1": 5, "B2": 4, "B3": 3})) == ["B1"]
    assert table.match(long, idle("B1", "B2", "B3", loads={"B1": 6, "B2": 4, "B3": 3})) == ([], OVERLOADED)


def test_the_table_is_bounded_and_drops_the_least_recent_first():
    table = PrefixTable(max_entries=10)
    table.record(range(8), "B1")
    table.record([0], "B1")  # used again: now the most recent
    table.record(range(100, 104), "B2")
    assert len(table) == 10
    assert table.holders(0) == ("B1",)
    assert table.holders(1) == () and table.holders(2) == ()  # the two least recent went
    assert table.holders(103) == ("B2",)


def test_a_block_remembers_its_four_latest_servers():
    table = PrefixTable()
    for server_id in ("B1", "B2", "B3", "B4", "B5", "B3"):
        table.record([7], server_id)
    assert table.holders(7) == ("B3", "B5", "B4", "B2")


def test_twenty_conversations_over_three_servers_keep_their_server_while_loads_stay_in_bound():
    """Each turn, all 20 conversations are in flight at once; they share the system prompt's blocks."""
    table = PrefixTable(load_bound=1.25, load_slack=0)
    servers = ("B1", "B2", "B3")
    conversations = [[f"conversation {n} " * 30] for n in range(20)]
    placed: dict[int, str] = {}
    turn = 0
    for turn in range(6):
        loads = dict.fromkeys(servers, 0)
        for n, messages in enumerate(conversations):
            chain = hashes(chat(*messages))
            able = chosen(table, chain, idle(*servers, loads=loads))
            if len(able) != 1:  # new, or matching only the shared system prompt: round-robin places it
                assert turn == 0
                able = [servers[n % 3]]
            assert placed.setdefault(n, able[0]) == able[0], f"conversation {n} moved at turn {turn}"
            table.record(chain, able[0])
            loads[able[0]] += 1
            messages += [f"answer {turn} " * 8, f"question {turn + 1} " * 8]
    assert turn == 5
    assert sorted(list(placed.values()).count(s) for s in servers) == [6, 7, 7]
