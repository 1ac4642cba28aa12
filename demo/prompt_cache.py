"""A fake LLM box's stand-in for a KV prefix cache: the prompt blocks it has served, bounded, least recent dropped.

A real engine (vLLM's automatic prefix caching, SGLang's radix cache) skips the prefill of a
prompt's start it has in its cache. This one renders the prompt as the gateway's prefix routing
does (each message's role and content, or the `system` and `prompt`), cuts it into blocks of
`block_chars` characters, chains their hashes (a block's hash covers every block before it, and
the model), and counts how many leading blocks it has seen: its cache hits. The box then waits
`cold_ms_per_block` for each block it had not seen, as a prefill would take. Kept apart from the
gateway's code: a box knows nothing of the gateway.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

SEPARATOR, END = "\x1f", "\x1e"
MAX_PROMPT_BLOCKS = 4096  # blocks of one prompt looked at: 1 M characters at 256 a block


@dataclass(frozen=True)
class Lookup:
    """What the cache held of one prompt."""

    hit_blocks: int  # leading blocks it had seen
    blocks: int  # full blocks in the prompt


class PromptCache:
    """The chained hashes of the prompt blocks a box served, at most `capacity` of them, least recent dropped."""

    def __init__(self, block_chars: int = 256, capacity: int = 10_000) -> None:
        self.block_chars = block_chars
        self.capacity = capacity
        self._blocks: OrderedDict[bytes, None] = OrderedDict()
        self._lock = threading.Lock()  # the box's handlers run on many threads
        self.requests = 0
        self.hit_blocks = 0
        self.miss_blocks = 0
        self.requests_with_hits = 0

    def serve(self, model: str, body: dict[str, Any]) -> Lookup:
        """Look the prompt up, count its hits, and keep its blocks as the most recent."""
        hashes = self.hashes(model, body)
        with self._lock:
            hits = 0
            while hits < len(hashes) and hashes[hits] in self._blocks:
                hits += 1
            for block in hashes:
                self._blocks[block] = None
                self._blocks.move_to_end(block)
            while len(self._blocks) > self.capacity:
                self._blocks.popitem(last=False)
            self.requests += 1
            self.hit_blocks += hits
            self.miss_blocks += len(hashes) - hits
            self.requests_with_hits += hits > 0
        return Lookup(hits, len(hashes))

    def hashes(self, model: str, body: dict[str, Any]) -> list[bytes]:
        """The chained hashes of the prompt's full blocks, the model first in the chain."""
        size = self.block_chars
        text = rendered(body, size * MAX_PROMPT_BLOCKS)
        digest = hashlib.blake2b(model.encode("utf-8", "surrogatepass"), digest_size=16).digest()
        hashes = []
        for start in range(0, len(text) - size + 1, size):
            digest = hashlib.blake2b(digest + text[start : start + size].encode("utf-8", "surrogatepass")).digest()
            hashes.append(digest)
        return hashes

    def stats(self) -> dict[str, Any]:
        """The counts since the box started, and how many blocks it holds."""
        with self._lock:
            looked_up = self.hit_blocks + self.miss_blocks
            return {
                "requests": self.requests,
                "requests_with_hits": self.requests_with_hits,
                "hit_blocks": self.hit_blocks,
                "miss_blocks": self.miss_blocks,
                "hit_rate": round(self.hit_blocks / looked_up, 4) if looked_up else None,
                "cached_blocks": len(self._blocks),
                "capacity_blocks": self.capacity,
                "block_chars": self.block_chars,
            }


class SimulatedPrefill:
    """A box's prefill: the prompt looked up in its cache, then `cold_ms_per_block` for each block it lacked.

    With `slots`, at most that many prefills wait at once and the rest queue, as on a GPU whose
    prefill throughput is fixed; 0 lets every request wait on its own.
    """

    def __init__(self, cache: PromptCache, cold_ms_per_block: float = 0.0, slots: int = 0) -> None:
        self.cache = cache
        self.cold_ms_per_block = cold_ms_per_block
        self.slots = threading.BoundedSemaphore(slots) if slots else None

    def run(self, model: str, body: dict[str, Any]) -> int:
        """Prefill one prompt; the leading blocks that were cached."""
        found = self.cache.serve(model, body)
        cold = found.blocks - found.hit_blocks
        if not self.cold_ms_per_block or not cold:
            return found.hit_blocks
        if self.slots is None:
            time.sleep(self.cold_ms_per_block * cold / 1000)
            return found.hit_blocks
        with self.slots:
            time.sleep(self.cold_ms_per_block * cold / 1000)
        return found.hit_blocks


def rendered(body: dict[str, Any], limit: int) -> str:
    """The prompt as text, up to `limit` characters: each message's role and content, or `system` and `prompt`."""
    messages = body.get("messages")
    if isinstance(messages, list):
        parts = [
            f"{message.get('role')}{SEPARATOR}{as_text(message.get('content'))}{END}"
            if isinstance(message, dict)
            else as_text(message) + END
            for message in messages
        ]
    else:
        parts = [as_text(body[name]) + END for name in ("system", "prompt") if body.get(name) is not None]
    return "".join(parts)[:limit]


def as_text(value: Any) -> str:
    """A message's content as text: a string as it is, content parts by their text."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return "".join(as_text(part.get("text", "")) if isinstance(part, dict) else as_text(part) for part in value)
    return "" if value is None else str(value)
