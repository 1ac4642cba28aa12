"""Prefix-aware routing (ROUTING_POLICY=prefix): the prompt's first blocks, hashed, and who served them last.

A request's prompt (its `messages`, or its `system` and `prompt`) is rendered into text and cut
into fixed-size blocks of characters. Each block's hash covers every block before it, so one hash
names a whole prefix. A bounded LRU table maps each recent block hash to the servers that served
it last. A request goes to a server holding its longest known prefix, while that server stays
within a bounded load (Mirrokni, Thorup and Zadimoghaddam's consistent hashing with bounded
loads: at most ceil(c x the average) in flight, counting this request, or a small absolute slack
where that is more); else the caller falls back to round-robin. Pure and in memory: no I/O, and
the caller holds the fleet's lock.
"""

from __future__ import annotations

import hashlib
import math
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from gateway.routing.catalog import model_key
from gateway.routing.policies import Candidate

BLOCK_SIZE = 256  # characters a block: about 64 tokens of English text
MAX_BLOCKS = 32  # blocks hashed a request: 8,192 characters at most, whatever the prompt's length
LOAD_BOUND = 1.25  # c = 1 + epsilon: a server may hold ceil(c x average) of the requests in flight
# A server may hold this many whatever the average: an LLM server batches requests, so at low load
# the bound alone (1 of 2 in flight over 3) would send a conversation to a cold cache for nothing.
# 4 is Ollama's default OLLAMA_NUM_PARALLEL: as many as it runs at once without queueing.
LOAD_SLACK = 4
TABLE_SIZE = 100_000  # block hashes remembered, least recently used dropped first
HOLDERS = 4  # servers remembered for one block hash, the most recent first
# The routes whose bodies carry a prompt a server's KV cache can keep; embeddings and the rest do not.
PROMPT_PATHS = frozenset({"/v1/chat/completions", "/v1/completions", "/api/chat", "/api/generate"})
FIELD_END, MESSAGE_END = "\x1f", "\x1e"  # ASCII unit and record separators: JSON text rarely holds them raw
MAX_DEPTH = 8  # how deep a message's content is rendered: content parts, lists of token ids
# How a prefix choice went, as gateway_prefix_routing_total counts it: a holder of the longest
# prefix it could take was within its load bound (hit); else a holder was a candidate but over
# its bound (overloaded); else every holder was passed over before the policy (unavailable: gone,
# down, drained, ejected, capped, in a worse tier); or no block of the prompt was known (miss).
HIT, OVERLOADED, UNAVAILABLE, MISS = "hit", "overloaded", "unavailable", "miss"
RESULTS = (HIT, OVERLOADED, UNAVAILABLE, MISS)


def prompt_text(payload: Mapping[str, Any], limit: int) -> str:
    """The first `limit` characters of the prompt a body renders: role and content of each message, in order,
    or Ollama's `system` and the `prompt`.
    """
    pieces: list[str] = []
    room = limit
    messages = payload.get("messages")
    if isinstance(messages, list):
        for message in messages:
            if room <= 0:
                break
            if isinstance(message, dict):
                role = _text(message.get("role"), 64, 0)
                piece = role + FIELD_END + _text(message.get("content"), room, 0) + MESSAGE_END
            else:
                piece = _text(message, room, 0) + MESSAGE_END
            pieces.append(piece)
            room -= len(piece)
    else:
        for name in ("system", "prompt"):  # Ollama's /api/generate puts its system prompt first
            value = payload.get(name)
            if value is not None and room > 0:
                piece = _text(value, room, 0) + MESSAGE_END
                pieces.append(piece)
                room -= len(piece)
    return "".join(pieces)[:limit]


def _text(value: Any, room: int, depth: int) -> str:
    """A JSON value as text, at most about `room` characters of it read: strings as they are."""
    if isinstance(value, str):
        return value[:room]
    if depth >= MAX_DEPTH or room <= 0:
        return ""
    if isinstance(value, list):
        parts = []
        for item in value:  # content parts ({"type": "text", "text": ...}), or token ids
            part = _text(item, room, depth + 1) + FIELD_END
            parts.append(part)
            room -= len(part)
            if room <= 0:
                break
        return "".join(parts)
    if isinstance(value, dict):
        parts = []
        for key in sorted(value):
            part = f"{key}={_text(value[key], room, depth + 1)}{FIELD_END}"
            parts.append(part)
            room -= len(part)
            if room <= 0:
                break
        return "".join(parts)
    return "" if value is None else str(value)


def prefix_hashes(
    model: str, payload: Mapping[str, Any], block_size: int = BLOCK_SIZE, max_blocks: int = MAX_BLOCKS
) -> tuple[int, ...]:
    """The chained hashes of the prompt's first full blocks (at most `max_blocks`); the model seeds the chain."""
    text = prompt_text(payload, block_size * max_blocks)
    digest = hashlib.blake2b(model_key(model).encode("utf-8", "surrogatepass"), digest_size=8).digest()
    hashes = []
    # Only full blocks: the last, partial one changes as the conversation grows, so it would never match.
    for start in range(0, len(text) - block_size + 1, block_size):
        block = text[start : start + block_size].encode("utf-8", "surrogatepass")  # a lone "\ud800" from JSON too
        digest = hashlib.blake2b(digest + block, digest_size=8).digest()
        hashes.append(int.from_bytes(digest, "big"))
    return tuple(hashes)


def load_cap(weight: float, total: int, weights: float, load_bound: float, slack: int = 0) -> int:
    """The most requests a server of `weight` may hold: ceil(c x its weighted share of `total`), or `slack` if more."""
    # The 1e-9 keeps float noise (1.25 * 12 / 3 = 5.000000001) from lifting the cap by one.
    return max(math.ceil(load_bound * total * weight / weights - 1e-9), slack)


class PrefixTable:
    """Recent prefix block hash -> the servers that served it, most recent first; bounded, LRU."""

    def __init__(
        self, max_entries: int = TABLE_SIZE, load_bound: float = LOAD_BOUND, load_slack: int = LOAD_SLACK
    ) -> None:
        self.max_entries = max_entries
        self.load_bound = load_bound
        self.load_slack = load_slack
        self._holders: OrderedDict[int, tuple[str, ...]] = OrderedDict()
        self._alone: dict[str, tuple[str]] = {}  # one ("B1",) shared by every block B1 alone holds: 48 bytes less each

    def __len__(self) -> int:
        return len(self._holders)

    def holders(self, block_hash: int) -> tuple[str, ...]:
        """The servers remembered as having served this prefix, most recent first."""
        return self._holders.get(block_hash, ())

    def choose(self, hashes: Sequence[int], candidates: Sequence[Candidate]) -> list[Candidate]:
        """The candidates within their load bound that served the longest of these prefixes; empty when none did.

        Several come back when several hold that prefix (a system prompt that many conversations
        share): the caller rotates among them, so that new conversations spread instead of piling
        on whichever server served the shared part last.
        """
        return self.match(hashes, candidates)[0]

    def match(self, hashes: Sequence[int], candidates: Sequence[Candidate]) -> tuple[list[Candidate], str]:
        """`choose`'s holders, and how it went: HIT, else OVERLOADED, UNAVAILABLE or MISS (see RESULTS)."""
        by_id = {c.server_id: c for c in candidates}
        total = sum(c.in_flight for c in candidates) + 1  # this request counts: Mirrokni et al.'s m + 1
        weights = sum(c.weight for c in candidates)
        over = passed = False  # a holder over its load bound; one not among the candidates
        for block_hash in reversed(hashes):  # the longest prefix first
            found = self._holders.get(block_hash)
            if found is None:
                continue
            able = []
            for server_id in found:
                candidate = by_id.get(server_id)
                if candidate is None:  # gone, unhealthy, draining, ejected, capped, or in a worse tier
                    passed = True
                elif candidate.in_flight < load_cap(candidate.weight, total, weights, self.load_bound, self.load_slack):
                    able.append(candidate)
                else:
                    over = True
            if able:
                return able, HIT
            # A shorter prefix may name another server that holds part of it.
        return [], OVERLOADED if over else UNAVAILABLE if passed else MISS

    def record(self, hashes: Iterable[int], server_id: str) -> None:
        """Remember `server_id` as the latest to serve each of these prefixes."""
        table = self._holders
        for block_hash in hashes:
            found = table.get(block_hash)
            if found is None:
                alone = self._alone.get(server_id)
                if alone is None:
                    alone = self._alone[server_id] = (server_id,)
                table[block_hash] = alone
                continue
            table.move_to_end(block_hash)
            if found[0] != server_id:
                others = tuple(held for held in found if held != server_id)
                table[block_hash] = (server_id, *others[: HOLDERS - 1])
        while len(table) > self.max_entries:
            table.popitem(last=False)
