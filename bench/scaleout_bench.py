"""Issue 15's figures for Redis mode (REDIS_URL), measured on gunicorn gateways as deployed.

  cpu           CPU µs per proxied GET, Redis mode against embedded mode, one worker each, interleaved rounds
  throughput    requests/s with GATEWAY_WORKERS=1 and 2 (Redis mode), and the cores every process used meanwhile
  propagation   from a registration sent to gateway A until gateway B (same Redis) routes a request to it,
                and from an unregistration at A until B stops routing there

Run:  .venv/bin/python bench/scaleout_bench.py [--quick] [--json-out FILE]
      (in the suite: .venv/bin/python bench/run_suite.py --only scaleout --keep-others)
"""

from __future__ import annotations

import contextlib
import shlex
import statistics
import time
from pathlib import Path
from typing import Any

from gateways import Gateway, start_gateway
from nginx_services import GET_PATH, STAND_INS, start_stand_ins
from plan import Plan, ratio, run_alone, say, say_aims
from processes import Service, ServiceFailed, free_port
from scaleout_probes import (
    REDIS_PERSISTENCE,
    Meters,
    accounted_run,
    background_cores,
    start_redis,
    time_propagation,
)
from wrk_load import run_wrk

# Issue 15's aims.
AIM_CPU_RATIO = 1.2  # Redis mode's CPU per plain request at most 1.2 x embedded mode's
AIM_WORKERS_RATIO = 1.6  # 2 workers at least 1.6 x the requests/s of one
AIM_PROPAGATION_MS = 1000.0  # a registration at A routes at B within 1 s (every sample)
CPU_CONNECTIONS = 64
BOOTED = 'logger=gateway.fleet.registry msg="loaded '  # each worker logs it once it has read the fleet


def bench_scaleout(folder: Path, plan: Plan) -> dict[str, Any]:
    """Every figure of issue 15 on one redis-server and one set of nginx stand-ins."""
    with contextlib.ExitStack() as stack:
        redis, url = start_redis(folder / "redis")
        stack.callback(redis.stop)
        stand_ins, ports = start_stand_ins(folder, stack)
        started = {
            name: _start(stack, folder, name, env, ports)
            for name, env in (
                ("redis-2w", {"REDIS_URL": url, "REDIS_PREFIX": "bench-2w:", "GATEWAY_WORKERS": "2"}),
                ("redis-1w", {"REDIS_URL": url, "REDIS_PREFIX": "bench-1w:", "GATEWAY_WORKERS": "1"}),
                ("embedded", {}),
            )
        }
        meters = {
            name: Meters(gateway, stand_ins, None if name == "embedded" else redis) for name, gateway in started.items()
        }
        say(
            f"scaleout: redis :{url.rsplit(':', 1)[1]}, stand-ins {ports}, "
            + ", ".join(f"{n} :{g.port}" for n, g in started.items())
        )
        for gateway in started.values():  # fill each worker's pools before anything is timed
            for connections in plan.scaleout_connections:
                run_wrk("warm-up", gateway.url + GET_PATH, connections=connections, duration_s=plan.warmup_s)
        background = [background_cores(plan.scaleout_idle_s)]  # every process of ours started, none loaded
        runs = []
        for connections, rounds in zip(plan.scaleout_connections, plan.scaleout_rounds, strict=True):
            names = ["embedded", "redis-1w", "redis-2w"] if connections == CPU_CONNECTIONS else ["redis-1w", "redis-2w"]
            for number in range(1, rounds + 1):
                for name in names:  # interleaved: the other helpers' load hits every configuration alike
                    runs.append({"round": number, **_measured(meters[name], connections, plan.scaleout_seconds)})
        background.append(background_cores(plan.scaleout_idle_s))
        say(f"  the machine's busy cores with ours idle: {background[0]} before the runs, {background[1]} after")
        for gateway in started.values():
            gateway.stop()
        propagation = _propagation(stack, folder, url, ports, plan)
    results = {"setup": _setup(plan), "background_cores": background, "runs": runs, "propagation": propagation}
    results["cpu"] = cpu_comparison(runs)
    results["throughput"] = throughput_comparison(runs, plan)
    results["aims"] = aims(results)
    return results


def _start(stack: contextlib.ExitStack, folder: Path, name: str, env: dict[str, str], ports: list[int]) -> Gateway:
    """Start a gateway, register the stand-ins, and wait until each of its workers has read the fleet."""
    gateway = start_gateway(folder / name, free_port(), env, name)
    stack.callback(gateway.stop)
    gateway.register_stand_ins(ports)
    workers = int(env.get("GATEWAY_WORKERS", "1"))
    if env:
        wait_for_workers(gateway.service, workers)
    return gateway


def wait_for_workers(service: Service, workers: int, timeout_s: float = 60.0) -> None:
    """Wait until `workers` workers have each logged loading the fleet (a worker boots after the first answers)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        service.check_running()
        if service.log_path.read_text(errors="replace").count(BOOTED) >= workers:
            return
        time.sleep(0.1)
    raise ServiceFailed(f"{service.name}: fewer than {workers} workers booted within {timeout_s:g}s")


def _measured(meters: Meters, connections: int, seconds: float) -> dict[str, Any]:
    row = accounted_run(meters, connections, seconds)
    cores = row["cores"]
    workers = "+".join(f"{value:.2f}" for value in cores["gateway_workers"])
    say(
        f"  {row['target']:<9} c={connections:<3} {row['requests_per_s']:>7.0f} req/s  "
        f"cpu {row['cpu_us_per_request']:6.1f} µs/req  cores: gateway {cores['gateway']:.2f} ({workers}) "
        f"wrk {cores['wrk']:.2f} stand-ins {cores['stand_ins']:.2f} redis {cores['redis']:.2f} "
        f"others {cores['others']:.2f}  errors {row['errors']}"
    )
    return row


def _propagation(stack: contextlib.ExitStack, folder: Path, url: str, ports: list[int], plan: Plan) -> dict[str, Any]:
    """Gateways A and B on one fleet in Redis; B answers 503 at once when it knows no server (QUEUE_TIMEOUT=0)."""
    env = {"REDIS_URL": url, "REDIS_PREFIX": "bench-ab:", "GATEWAY_WORKERS": "1", "QUEUE_TIMEOUT": "0"}
    a = start_gateway(folder / "a", free_port(), env, "gateway-a")
    stack.callback(a.stop)
    b = start_gateway(folder / "b", free_port(), env, "gateway-b")
    stack.callback(b.stop)
    wait_for_workers(b.service, 1)
    say(f"  propagation: A :{a.port}, B :{b.port}, {plan.scaleout_samples} samples")
    found = time_propagation(a, b, ports, plan.scaleout_samples, plan.scaleout_deadline_s)
    say(
        f"  routed at B after the register call: median {found.get('routed_at_b_ms_median')} ms, "
        f"p95 {found.get('routed_at_b_ms_p95')} ms, max {found.get('routed_at_b_ms_max')} ms, "
        f"missed {found.get('routed_at_b_ms_missed')}; gone at B after the unregister call: median "
        f"{found.get('gone_at_b_ms_median')} ms, max {found.get('gone_at_b_ms_max')} ms"
    )
    return found


def _setup(plan: Plan) -> dict[str, Any]:
    return {
        "gateways": "gunicorn -c deploy/gunicorn.conf.py app:app, LOG_LEVEL=INFO; embedded: the defaults; "
        "redis-1w / redis-2w: REDIS_URL with GATEWAY_WORKERS=1 / 2, each on its own REDIS_PREFIX",
        "redis": f"redis-server {shlex.join(REDIS_PERSISTENCE)}, on 127.0.0.1",
        "servers": f"{STAND_INS} nginx stand-ins (one nginx worker), registered at every gateway",
        "wrk": f"GET {GET_PATH}, -t1, {plan.scaleout_seconds:g} s per run, rounds interleaved across gateways",
        "propagation": "A and B: REDIS_URL, one worker each, QUEUE_TIMEOUT=0; B polled on a kept-alive "
        "connection about once a ms; one server in the fleet at a time, a new id each sample",
        "deadline_s": plan.scaleout_deadline_s,
    }


def _median(values: list[float]) -> float | None:
    return round(statistics.median(values), 2) if values else None


def cpu_comparison(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians of CPU µs per request at CPU_CONNECTIONS, and Redis mode over embedded."""
    picked = [run for run in runs if run["connections"] == CPU_CONNECTIONS]

    def values(name: str, key: str) -> list[float]:
        return [run[key] for run in picked if run["target"] == name and run[key] is not None]

    embedded = _median(values("embedded", "cpu_us_per_request"))
    redis = _median(values("redis-1w", "cpu_us_per_request"))
    redis_server = _median(values("redis-1w", "redis_cpu_us_per_request"))
    with_server = round(redis + redis_server, 2) if redis is not None and redis_server is not None else None
    return {
        "connections": CPU_CONNECTIONS,
        "embedded_us": embedded,
        "redis_us": redis,
        "redis_server_us": redis_server,
        "embedded_rounds": values("embedded", "cpu_us_per_request"),
        "redis_rounds": values("redis-1w", "cpu_us_per_request"),
        "ratio": ratio(redis, embedded),
        "ratio_with_redis_server": ratio(with_server, embedded),
    }


def throughput_comparison(runs: list[dict[str, Any]], plan: Plan) -> list[dict[str, Any]]:
    """For each connection count: median req/s and cores of 1 and 2 workers, and 2 over 1."""
    rows = []
    for connections in plan.scaleout_connections:
        picked = {
            name: [run for run in runs if run["connections"] == connections and run["target"] == name]
            for name in ("redis-1w", "redis-2w")
        }
        row: dict[str, Any] = {"connections": connections}
        for name, found in picked.items():
            key = name.removeprefix("redis-")
            row[f"{key}_per_s"] = _median([run["requests_per_s"] for run in found])
            for part in ("gateway", "wrk", "stand_ins", "redis", "others", "machine"):
                row[f"{key}_{part}_cores"] = _median([run["cores"][part] for run in found])
            # Requests per core the gateway got: the same for 1 and 2 means the workers do not get in each
            # other's way, and that the cores left to the gateway, not the design, cap the ratio.
            row[f"{key}_per_gateway_core"] = _median(
                [run["requests_per_s"] / run["cores"]["gateway"] for run in found if run["cores"]["gateway"]]
            )
            row[f"{key}_errors"] = sum(run["errors"] for run in found)
        # Per round, then the median: each pair ran back to back, under the same outside load.
        pairs = zip(picked["redis-1w"], picked["redis-2w"], strict=False)
        row["round_ratios"] = [ratio(two["requests_per_s"], one["requests_per_s"]) for one, two in pairs]
        row["ratio"] = _median([value for value in row["round_ratios"] if value is not None])
        rows.append(row)
    return rows


def aims(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Issue 15's aims, each with this run's figure and whether it was met."""
    cpu, propagation = results["cpu"], results["propagation"]
    throughput = results["throughput"]
    worst = min((row["ratio"] for row in throughput if row["ratio"] is not None), default=None)
    slowest = propagation.get("routed_at_b_ms_max")
    missed = propagation.get("routed_at_b_ms_missed", 0)
    return [
        {
            "aim": f"Redis mode's CPU per plain request ≤ {AIM_CPU_RATIO} x embedded's (c={CPU_CONNECTIONS}, medians)",
            "figure": f"{cpu['redis_us']} / {cpu['embedded_us']} µs = {cpu['ratio']}",
            "met": cpu["ratio"] is not None and cpu["ratio"] <= AIM_CPU_RATIO,
        },
        {
            "aim": f"2 workers ≥ {AIM_WORKERS_RATIO} x the requests/s of 1 (Redis mode)",
            "figure": "; ".join(
                f"c={row['connections']}: {row['ratio']} (the gateway got {row['1w_gateway_cores']} / "
                f"{row['2w_gateway_cores']} cores of 2)"
                for row in throughput
            ),
            "met": worst is not None and worst >= AIM_WORKERS_RATIO,
        },
        {
            "aim": f"a registration at A routes at B within {AIM_PROPAGATION_MS:.0f} ms (every sample)",
            "figure": f"median {propagation.get('routed_at_b_ms_median')} ms, "
            f"p95 {propagation.get('routed_at_b_ms_p95')} ms, max {slowest} ms, {missed} missed",
            "met": slowest is not None and slowest <= AIM_PROPAGATION_MS and not missed,
        },
    ]


if __name__ == "__main__":
    run_alone(__doc__, bench_scaleout, "scaleout", "short runs and few samples", say_aims)
