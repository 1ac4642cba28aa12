"""How long and how hard each part of the suite runs, and its progress lines."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Plan:
    """How long and how hard each part runs; --quick picks the small one."""

    duration_s: float = 6.0
    warmup_s: float = 1.0
    connections: tuple[int, ...] = (64, 256)
    methods: tuple[str, ...] = ("GET", "POST")
    single_connection_s: float = 5.0
    first_token_samples: int = 20
    stream_steps: tuple[int, ...] = (500, 1000, 2000, 3000, 4000)
    stream_worker_connections: int = 4500
    stream_budget_s: float = 150.0
    sweep_sizes: tuple[int, ...] = (100, 1000, 5000)
    sweep_timeout_s: float = 2.0
    sweep_repeat: int = 2
    routing_sizes: tuple[int, ...] = (10, 1000, 10000)
    routing_repeat: int = 3
    routing_max_seconds: float = 0.5
    registration_fleet: int = 1000
    registration_clients: int = 8
    registration_deadline_s: float = 60.0
    jobs_one_client: int = 1000  # submitted from 1 client; the rest of jobs_drain from jobs_clients
    jobs_clients: int = 32
    jobs_drain: int = 5000  # the backlog drained, and the synchronous requests it is compared with
    jobs_servers: int = 3
    jobs_slots_per_server: int = 11  # max_concurrent each: 33 in flight, as the 33 synchronous clients
    jobs_first_dispatch_repeats: int = 5
    jobs_lease_repeats: int = 10
    jobs_deadline_s: float = 60.0  # for each batch of calls, and for the drain
    scaleout_connections: tuple[int, ...] = (64, 256)
    scaleout_rounds: tuple[int, ...] = (5, 3)  # interleaved rounds at each of scaleout_connections
    scaleout_seconds: float = 4.0
    scaleout_samples: int = 50  # registrations timed from gateway A to gateway B
    scaleout_deadline_s: float = 5.0  # for each of them to show at B
    scaleout_idle_s: float = 2.0  # the machine's busy cores read with ours idle, before and after the rounds
    prefix_conversations: int = 20
    prefix_turns: int = 8
    prefix_servers: int = 3
    prefix_rounds: int = 2  # round_robin then prefix, each on fresh boxes, this many times
    prefix_system_chars: int = 3000  # each conversation's own system prompt
    prefix_user_chars: int = 300  # each user message
    prefix_answer_tokens: int = 8  # the fake's answer: about 20 characters a token
    prefix_cold_ms_per_block: float = 4.0  # a 256-character block (about 64 tokens) at 16k tokens/s of prefill
    prefix_deadline_s: float = 60.0  # for each run's conversations
    prefix_cost_repeats: int = 2000  # hashes and choices timed in process


QUICK = Plan(
    duration_s=2.0,
    warmup_s=1.0,
    connections=(64,),
    single_connection_s=2.0,
    first_token_samples=5,
    stream_steps=(200, 500),
    stream_budget_s=40.0,
    sweep_sizes=(100,),
    sweep_repeat=1,
    routing_sizes=(10, 1000),
    routing_repeat=1,
    routing_max_seconds=0.2,
    registration_fleet=200,
    registration_deadline_s=20.0,
    jobs_one_client=200,
    jobs_drain=1000,
    jobs_first_dispatch_repeats=3,
    jobs_lease_repeats=3,
    jobs_deadline_s=20.0,
    scaleout_connections=(64,),
    scaleout_rounds=(2,),
    scaleout_seconds=2.0,
    scaleout_samples=10,
    scaleout_idle_s=1.0,
    prefix_turns=4,
    prefix_rounds=1,
    prefix_cost_repeats=200,
)


def say(message: str) -> None:
    """Progress on stdout, flushed: make shows it as it happens."""
    print(message, flush=True)


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    """numerator / denominator to 3 places; None when either is missing or zero."""
    return round(numerator / denominator, 3) if numerator and denominator else None


def run_alone(
    doc: str | None,
    bench: Callable[[Path, Plan], dict[str, Any]],
    name: str,
    quick_help: str,
    show: Callable[[dict[str, Any]], None],
) -> None:
    """One section's own command line: --quick, --json-out; exits 130 on Ctrl-C, every process stopped."""
    from processes import interrupt_on_sigterm  # here: the suite imports plan before anything starts

    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0] if doc else None)
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument("--json-out", type=Path, help="write the figures here as JSON")
    args = parser.parse_args()
    interrupt_on_sigterm()
    try:
        with tempfile.TemporaryDirectory(prefix=f"gateway-{name}-bench-") as temp:
            results = bench(Path(temp), QUICK if args.quick else Plan())
    except KeyboardInterrupt:
        print("interrupted; every process the bench started has been stopped", file=sys.stderr)
        sys.exit(130)
    if args.json_out:
        args.json_out.write_text(json.dumps(results, indent=2) + "\n")
    show(results)
    sys.exit(0)


def say_aims(results: dict[str, Any]) -> None:
    """Each aim of a section, met or missed, with its figure."""
    for aim in results["aims"]:
        say(f"{'met   ' if aim['met'] else 'MISSED'} {aim['aim']}: {aim['figure']}")
