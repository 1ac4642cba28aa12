"""Issue 16's figures for prefix-aware routing (ROUTING_POLICY=prefix) against round_robin.

  workload    20 conversations from 20 clients at once, each a long system prompt of its own and a
              growing list of turns (each answer appended, as a client does), POST /v1/chat/completions
  boxes       3 fake LLM boxes (demo/fake_llm_server.py, one process each) with the simulated KV prefix
              cache: each prompt block they had not seen costs --cold-ms-per-block, one prefill at a time
  policies    the same workload through our gateway (gunicorn, as deployed) with ROUTING_POLICY=round_robin
              and =prefix, each on fresh boxes (cold caches), in alternating rounds
  figures     the boxes' cache hit rate, latency p50/p95, boxes per conversation, gateway CPU per request;
              in this process: the prefix table's memory per entry, and the cost of hashing and choosing

Run:  .venv/bin/python bench/prefix_bench.py [--quick] [--json-out FILE]
      (in the suite: .venv/bin/python bench/run_suite.py --only prefix --keep-others)
"""

from __future__ import annotations

import contextlib
import http.client
import json
import random
import sys
import threading
import time
import tracemalloc
from pathlib import Path
from typing import Any

from gateways import REPO, Gateway, start_gateway
from http_load import JSON_HEADERS, percentile
from plan import Plan, ratio, run_alone, say
from processes import HOST, Service, free_port

sys.path.insert(0, str(REPO))  # the gateway's own modules, for the in-process figures

from demo.prompt_cache import PromptCache
from gateway.routing.policies import Candidate
from gateway.routing.prefix import TABLE_SIZE, PrefixTable, prefix_hashes

FAKE = str(REPO / "demo" / "fake_llm_server.py")
MODEL = "bench-llm:8b"
POLICIES = ("round_robin", "prefix")
WORDS = (
    *("the", "gateway", "routes", "each", "request", "to", "a", "server", "that", "has", "its", "model"),
    *("loaded", "and", "keeps", "cache", "warm", "while", "conversations", "grow", "turn", "by", "with"),
    *("documents", "tools", "long", "instructions", "about", "tone", "format", "safety", "answers", "tokens"),
)


# -- the workload ------------------------------------------------------------------------------


def words(rng: random.Random, chars: int) -> str:
    """Text of about `chars` characters, drawn from WORDS."""
    picked: list[str] = []
    length = 0
    while length < chars:
        word = rng.choice(WORDS)
        picked.append(word)
        length += len(word) + 1
    return " ".join(picked)


def system_prompt(number: int, chars: int) -> str:
    """Conversation `number`'s own system prompt: its persona and document, shared by all its turns."""
    return f"You are assistant {number}. " + words(random.Random(number), chars)


def converse(
    port: int, number: int, plan: Plan, stop_at: float, samples: list[dict[str, Any]], lock: threading.Lock
) -> None:
    """One client: conversation `number`'s turns, one after the other, on one kept-alive connection."""
    rng = random.Random(1000 + number)
    ideal = PromptCache()  # one box that saw every turn: the most any routing can hit
    messages = [{"role": "system", "content": system_prompt(number, plan.prefix_system_chars)}]
    connection = http.client.HTTPConnection(HOST, port, timeout=30)
    try:
        for turn in range(plan.prefix_turns):
            if time.monotonic() > stop_at:
                return
            messages.append({"role": "user", "content": words(rng, plan.prefix_user_chars)})
            body = json.dumps({"model": MODEL, "messages": messages, "stream": False})
            found = ideal.serve(MODEL, {"messages": messages})
            sample: dict[str, Any] = {"conversation": number, "turn": turn, "ideal_hits": found.hit_blocks}
            started = time.perf_counter()
            try:
                connection.request("POST", "/v1/chat/completions", body, JSON_HEADERS)
                response = connection.getresponse()
                raw = response.read()
            except (OSError, http.client.HTTPException) as exc:
                sample["failure"] = type(exc).__name__
                connection.close()
                connection = http.client.HTTPConnection(HOST, port, timeout=30)
                messages.append({"role": "assistant", "content": "(no answer)"})
            else:
                sample["latency_s"] = time.perf_counter() - started
                sample["server"] = response.getheader("X-Backend-Server")
                sample["hit_blocks"] = int(response.getheader("X-Cache-Hit-Blocks") or 0)
                if response.status != 200:
                    sample["failure"] = f"HTTP {response.status}"
                    messages.append({"role": "assistant", "content": "(no answer)"})
                else:
                    answer = json.loads(raw)["choices"][0]["message"]["content"]
                    messages.append({"role": "assistant", "content": answer})
            with lock:
                samples.append(sample)
    finally:
        connection.close()


def run_workload(gateway: Gateway, plan: Plan) -> list[dict[str, Any]]:
    """Every conversation at once, one client thread each, bounded by the deadline."""
    samples: list[dict[str, Any]] = []
    lock = threading.Lock()
    stop_at = time.monotonic() + plan.prefix_deadline_s
    clients = [
        threading.Thread(target=converse, args=(gateway.port, n, plan, stop_at, samples, lock), daemon=True)
        for n in range(plan.prefix_conversations)
    ]
    for client in clients:
        client.start()
    for client in clients:
        client.join(plan.prefix_deadline_s + 35)
    return samples


# -- one policy on fresh boxes -----------------------------------------------------------------


def start_boxes(folder: Path, plan: Plan, stack: contextlib.ExitStack) -> list[tuple[str, int]]:
    """`prefix_servers` fake LLM boxes with cold caches, a process each; their ids and ports."""
    boxes = []
    for number in range(1, plan.prefix_servers + 1):
        server_id, port = f"L{number}", free_port()
        argv = [sys.executable, FAKE, "--server-id", server_id, "--port", str(port), "--models", MODEL]
        argv += ["--chunks", str(plan.prefix_answer_tokens), "--chunk-delay", "0"]
        argv += ["--cold-ms-per-block", f"{plan.prefix_cold_ms_per_block:g}", "--prefill-slots", "1"]
        box = Service(f"fake-{server_id}", argv, folder / f"fake-{server_id}.log", cwd=REPO)
        stack.callback(box.stop)
        box.wait_for_port(port)
        boxes.append((server_id, port))
    return boxes


def box_stats(port: int) -> dict[str, Any]:
    connection = http.client.HTTPConnection(HOST, port, timeout=10)
    try:
        connection.request("GET", "/_stats")
        return dict(json.loads(connection.getresponse().read()))
    finally:
        connection.close()


def run_policy(folder: Path, policy: str, plan: Plan, number: int) -> dict[str, Any]:
    """The workload through a gateway with ROUTING_POLICY=`policy`, on fresh boxes."""
    folder.mkdir(parents=True)
    with contextlib.ExitStack() as stack:
        boxes = start_boxes(folder, plan, stack)
        gateway = start_gateway(folder / "ours", free_port(), {"ROUTING_POLICY": policy}, name=f"ours-{policy}")
        stack.callback(gateway.stop)
        for server_id, port in boxes:
            gateway.register(server_id, port, models=[MODEL])
        cpu_before, started = gateway.service.cpu_seconds(), time.perf_counter()
        samples = run_workload(gateway, plan)
        seconds = time.perf_counter() - started
        time.sleep(0.3)  # what the last answers cost the gateway shows in its CPU time
        cpu = gateway.service.cpu_seconds() - cpu_before
        stats = [box_stats(port) for _, port in boxes]
    run = summarize(policy, samples, stats, seconds, cpu)
    run["round"] = number
    say(
        f"  round {number} {policy:<11} hit rate {run['hit_rate']:.3f}  p50 {run['p50_ms']:7.1f} ms  "
        f"p95 {run['p95_ms']:7.1f} ms  boxes/conversation {run['boxes_per_conversation']:.2f}  "
        f"gateway {run['gateway_cpu_us_per_request']:.0f} µs/req  failures {sum(run['failures'].values())}"
    )
    return run


def summarize(
    policy: str, samples: list[dict[str, Any]], stats: list[dict[str, Any]], seconds: float, cpu: float
) -> dict[str, Any]:
    """One run's figures: the boxes' cache counts, the clients' latencies, where each conversation went."""
    answered = [s for s in samples if "failure" not in s]
    latencies = sorted(s["latency_s"] for s in answered)
    later = sorted(s["latency_s"] for s in answered if s["turn"] > 0)
    failures: dict[str, int] = {}
    for sample in samples:
        if "failure" in sample:
            failures[sample["failure"]] = failures.get(sample["failure"], 0) + 1
    homes: dict[int, set[str]] = {}
    for sample in answered:
        homes.setdefault(sample["conversation"], set()).add(sample["server"])
    hits = sum(s["hit_blocks"] for s in stats)
    blocks = hits + sum(s["miss_blocks"] for s in stats)
    ideal = sum(s["ideal_hits"] for s in answered)
    return {
        "policy": policy,
        "requests": len(samples),
        "answered": len(answered),
        "seconds": round(seconds, 3),
        "hit_blocks": hits,
        "prompt_blocks": blocks,
        "hit_rate": round(hits / blocks, 4) if blocks else 0.0,
        "ideal_hit_blocks": ideal,
        "ideal_hit_rate": round(ideal / blocks, 4) if blocks else 0.0,
        "requests_with_hits": sum(s["requests_with_hits"] for s in stats),
        "p50_ms": round(percentile(latencies, 50) * 1000, 2),
        "p95_ms": round(percentile(latencies, 95) * 1000, 2),
        "later_turns_p50_ms": round(percentile(later, 50) * 1000, 2),
        "boxes_per_conversation": round(sum(len(h) for h in homes.values()) / len(homes), 2) if homes else 0.0,
        "requests_per_box": {s["server_id"]: s["requests"] for s in stats},
        "gateway_cpu_us_per_request": round(cpu / len(answered) * 1e6, 1) if answered else None,
        "failures": failures,
        "latencies_ms": [round(value * 1000, 2) for value in latencies],
    }


# -- in this process: the table's memory, the cost of hashing and choosing ---------------------


def table_costs(plan: Plan) -> dict[str, Any]:
    """Bytes per entry of a full table (tracemalloc), and µs to hash a prompt and to choose and record."""
    rng = random.Random(7)
    servers = [f"L{n}" for n in range(1, plan.prefix_servers + 1)]
    tracemalloc.start()
    try:
        table = PrefixTable()
        before = tracemalloc.get_traced_memory()[0]
        count = 0
        while len(table) < TABLE_SIZE:  # chains of 32 fresh 64-bit hashes, as requests record them
            table.record([rng.getrandbits(64) for _ in range(32)], servers[count % len(servers)])
            count += 1
        table_bytes = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    body = {"messages": [{"role": "system", "content": system_prompt(0, 9000)}]}  # over the 32-block bound
    repeats = plan.prefix_cost_repeats
    started = time.perf_counter()
    for _ in range(repeats):
        chain = prefix_hashes(MODEL, body)
    hash_us = (time.perf_counter() - started) / repeats * 1e6
    candidates = [Candidate(server_id, 1.0, 2) for server_id in servers]
    started = time.perf_counter()
    for n in range(repeats):
        table.choose(chain, candidates)
        table.record(chain, servers[n % len(servers)])
    choose_us = (time.perf_counter() - started) / repeats * 1e6
    return {
        "entries": len(table),
        "table_mib": round(table_bytes / 2**20, 1),
        "bytes_per_entry": round(table_bytes / len(table), 1),
        "blocks_hashed": len(chain),
        "hash_us_per_request": round(hash_us, 1),
        "choose_and_record_us": round(choose_us, 1),
        "repeats": repeats,
    }


# -- the whole part ----------------------------------------------------------------------------


def bench_prefix(folder: Path, plan: Plan) -> dict[str, Any]:
    """Each policy on fresh boxes, rounds alternating; the pooled figures and their ratios."""
    runs = [
        run_policy(folder / f"{policy}-{number}", policy, plan, number)
        for number in range(1, plan.prefix_rounds + 1)
        for policy in POLICIES
    ]
    pooled = {policy: pool([run for run in runs if run["policy"] == policy]) for policy in POLICIES}
    for run in runs:
        del run["latencies_ms"]  # pooled below; results.json keeps the figures, not every sample
    robin, prefix = pooled["round_robin"], pooled["prefix"]
    results = {
        "setup": setup(plan),
        "runs": runs,
        "pooled": pooled,
        "ratios": {
            "p50_round_robin_over_prefix": ratio(robin["p50_ms"], prefix["p50_ms"]),
            "p95_round_robin_over_prefix": ratio(robin["p95_ms"], prefix["p95_ms"]),
            "later_turns_p50_round_robin_over_prefix": ratio(robin["later_turns_p50_ms"], prefix["later_turns_p50_ms"]),
            "hit_rate_prefix_over_round_robin": ratio(prefix["hit_rate"], robin["hit_rate"]),
            "gateway_cpu_prefix_over_round_robin": ratio(
                prefix["gateway_cpu_us_per_request"], robin["gateway_cpu_us_per_request"]
            ),
        },
        "table": table_costs(plan),
    }
    return results


def pool(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One policy's runs together: latencies pooled, counts summed."""
    latencies = sorted(value for run in runs for value in run["latencies_ms"])
    answered = sum(run["answered"] for run in runs)
    hits, blocks = sum(run["hit_blocks"] for run in runs), sum(run["prompt_blocks"] for run in runs)
    ideal = sum(run["ideal_hit_blocks"] for run in runs)
    cpu = [run["gateway_cpu_us_per_request"] * run["answered"] for run in runs if run["gateway_cpu_us_per_request"]]
    return {
        "runs": len(runs),
        "requests": sum(run["requests"] for run in runs),
        "answered": answered,
        "hit_rate": round(hits / blocks, 4) if blocks else 0.0,
        "ideal_hit_rate": round(ideal / blocks, 4) if blocks else 0.0,
        "requests_with_hits": sum(run["requests_with_hits"] for run in runs),
        "p50_ms": round(percentile(latencies, 50), 2),
        "p95_ms": round(percentile(latencies, 95), 2),
        "later_turns_p50_ms": round(sorted(run["later_turns_p50_ms"] for run in runs)[len(runs) // 2], 2),
        "boxes_per_conversation": round(sum(run["boxes_per_conversation"] for run in runs) / len(runs), 2),
        "gateway_cpu_us_per_request": round(sum(cpu) / answered, 1) if answered and cpu else None,
        "failures": sum(sum(run["failures"].values()) for run in runs),
    }


def setup(plan: Plan) -> dict[str, Any]:
    return {
        "gateway": "gunicorn -c deploy/gunicorn.conf.py app:app (1 gevent worker), LOG_LEVEL=INFO, "
        "ROUTING_POLICY=round_robin or prefix (PREFIX_BLOCK_SIZE=256, PREFIX_MAX_BLOCKS=32, PREFIX_LOAD_BOUND=1.25)",
        "boxes": f"{plan.prefix_servers} fake LLM boxes (demo/fake_llm_server.py, one process each, fresh for each "
        f"run): 256-character cache blocks, {plan.prefix_cold_ms_per_block:g} ms per block not cached, one prefill "
        f"at a time (--prefill-slots 1), {plan.prefix_answer_tokens} answer tokens at once",
        "workload": f"{plan.prefix_conversations} conversations from as many client threads at once, "
        f"{plan.prefix_turns} turns each: a system prompt of its own of about {plan.prefix_system_chars:,} "
        f"characters, then a user message of about {plan.prefix_user_chars} characters a turn, each answer "
        "appended; POST /v1/chat/completions, not streamed",
        "rounds": plan.prefix_rounds,
        "conversations": plan.prefix_conversations,
        "turns": plan.prefix_turns,
        "cold_ms_per_block": plan.prefix_cold_ms_per_block,
    }


if __name__ == "__main__":
    run_alone(
        __doc__,
        bench_prefix,
        "prefix",
        "fewer turns, one round",
        lambda results: say(json.dumps(results["ratios"], indent=2)),
    )
