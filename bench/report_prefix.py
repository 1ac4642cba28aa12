"""The prefix-aware routing part of docs/benchmarks.md, rendered from the suite's results (bench/prefix_bench.py)."""

from __future__ import annotations

from typing import Any

from report_sections import failed_section, ratio_text, table

TITLE = "Prefix-aware routing"


def prefix_section(prefix: dict[str, Any] | None) -> str:
    failed = failed_section(prefix, TITLE)
    if failed or prefix is None:
        return failed or ""
    setup = prefix.get("setup", {})
    parts = [
        f"## {TITLE}\n",
        "bench/prefix_bench.py: "
        + "; ".join(str(setup.get(key, "")) for key in ("gateway", "boxes", "workload"))
        + f". Each policy ran {setup.get('rounds')} times on fresh boxes (cold caches), the rounds alternating. "
        "The boxes' sleeps stand in for a GPU's prefill, so the latencies are the simulation's; the hit rate is "
        "the routing's own. One run on the shared 2-core machine: read the ratios, from rounds run back to back.\n",
        _pooled(prefix),
        _runs(prefix.get("runs", [])),
        _table(prefix.get("table", {})),
    ]
    return "\n".join(part for part in parts if part)


def _pooled(prefix: dict[str, Any]) -> str:
    pooled, ratios = prefix.get("pooled", {}), prefix.get("ratios", {})
    rows = [
        (
            f"`{policy}`",
            p.get("answered"),
            p.get("hit_rate"),
            p.get("ideal_hit_rate"),
            p.get("requests_with_hits"),
            p.get("p50_ms"),
            p.get("p95_ms"),
            p.get("later_turns_p50_ms"),
            p.get("boxes_per_conversation"),
            p.get("gateway_cpu_us_per_request"),
            p.get("failures"),
        )
        for policy, p in pooled.items()
    ]
    header = (
        "policy",
        "answered",
        "cache hit rate (blocks)",
        "ideal",
        "requests with a hit",
        "p50 ms",
        "p95 ms",
        "later turns p50 ms",
        "boxes per conversation",
        "gateway CPU µs/request",
        "failures",
    )
    return (
        "### round_robin against prefix, every run pooled\n\n"
        "The hit rate is the boxes' own count: the prompt blocks they found cached over all the blocks they "
        "were sent; ideal is what one box that saw every turn of a conversation would have hit (each turn's new "
        "blocks are cold whatever the routing). Latency is each request's, at its client, pooled over the runs "
        "(later turns: the median of each run's median, first turns left out, which are cold under both). Boxes "
        "per conversation: how many "
        "boxes served one conversation's turns, on average (1.0: it never moved). Gateway CPU is the gateway "
        "process tree's over the run, per request answered; the clock tick is 10 ms, so a run's figure carries "
        "about ±60 µs.\n\n"
        + table(header, rows)
        + "\nround_robin / prefix: p50 **"
        + ratio_text(ratios.get("p50_round_robin_over_prefix"))
        + "**, p95 **"
        + ratio_text(ratios.get("p95_round_robin_over_prefix"))
        + "**, later turns' p50 **"
        + ratio_text(ratios.get("later_turns_p50_round_robin_over_prefix"))
        + "**; hit rate prefix / round_robin **"
        + ratio_text(ratios.get("hit_rate_prefix_over_round_robin"))
        + "**; gateway CPU per request prefix / round_robin "
        + ratio_text(ratios.get("gateway_cpu_prefix_over_round_robin"))
        + ".\n"
    )


def _runs(runs: list[dict[str, Any]]) -> str:
    if not runs:
        return ""
    rows = [
        (
            run.get("round"),
            f"`{run.get('policy')}`",
            run.get("seconds"),
            run.get("hit_rate"),
            run.get("p50_ms"),
            run.get("p95_ms"),
            run.get("boxes_per_conversation"),
            ", ".join(f"{box} {count}" for box, count in run.get("requests_per_box", {}).items()),
            run.get("gateway_cpu_us_per_request"),
        )
        for run in runs
    ]
    header = ("round", "policy", "seconds", "hit rate", "p50 ms", "p95 ms", "boxes/conv.", "requests per box", "µs/req")
    return "### Each run\n\n" + table(header, rows)


def _table(costs: dict[str, Any]) -> str:
    if not costs:
        return ""
    return (
        "### The prefix table's cost, in process\n\n"
        f"A full table of {costs.get('entries', 0):,} block hashes (each a chain of 32 recorded as a request "
        f"records them, over 3 servers) takes **{costs.get('table_mib')} MiB**, "
        f"**{costs.get('bytes_per_entry')} bytes per entry** (tracemalloc: the OrderedDict's node, the 64-bit "
        "int key, the shared holder tuple). Hashing a prompt over the bound "
        f"({costs.get('blocks_hashed')} blocks of 256 characters) takes **{costs.get('hash_us_per_request')} µs**, "
        f"and choosing then recording its server in the full table {costs.get('choose_and_record_us')} µs "
        f"(each the mean of {costs.get('repeats'):,}, in the bench's own process).\n"
    )
