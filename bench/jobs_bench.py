"""Issue 14's figures for the durable job queue, measured on our gateway under gunicorn, as deployed.

  submissions     durable submissions per second (each 202 means the job is fsynced) from 1 and 32 clients
  first dispatch  from a registration to the fake GPU server's first job, with the backlog queued
  drain           the backlog over 3 fake GPU servers, against the same requests sent synchronously
  long-poll lease from a submission's 202 to the answer of a worker waiting in POST /workers/lease
  memory          the gateway worker's RSS and the SQLite store's growth per queued job

Run:  .venv/bin/python bench/jobs_bench.py [--quick] [--json-out FILE]
      (in the suite: .venv/bin/python bench/run_suite.py --only jobs --keep-others)
"""

from __future__ import annotations

import contextlib
import sys
import time
from pathlib import Path
from typing import Any

from gateways import REPO, start_gateway
from job_probes import (
    JOB_BODY,
    JOB_PATH,
    SETTLE_S,
    drain,
    memory_per_job,
    memory_reading,
    send_synchronously,
    submit_jobs,
    time_first_dispatch,
    time_leases,
    top_up,
)
from plan import Plan, ratio, run_alone, say, say_aims
from processes import Service, free_port
from store_reader import StoreReader

FAKE = str(REPO / "demo" / "fake_gpu_server.py")
# Issue 14's aims: durable submissions/s (32 clients), ms to the first dispatch, drain / sync throughput.
AIM_SUBMISSIONS_PER_S = 1000.0
AIM_FIRST_DISPATCH_MS = 100.0
AIM_DRAIN_RATIO = 0.9

# -- the whole part ------------------------------------------------------------------------------


def bench_jobs(folder: Path, plan: Plan) -> dict[str, Any]:
    """Every figure of issue 14 from one gateway, in the order that keeps each one clean."""
    with contextlib.ExitStack() as stack:
        ports = start_fakes(folder, plan.jobs_servers, stack)
        gateway = start_gateway(folder / "ours", free_port(), name="ours-jobs")
        stack.callback(gateway.stop)
        store = StoreReader(gateway.folder / "jobs.db")
        say(f"jobs: ours :{gateway.port}, fake GPU servers on {ports} (not registered yet)")
        lease = time_leases(gateway, plan.jobs_lease_repeats)  # first: it needs an empty queue
        before = memory_reading(gateway, store)
        one = submit_jobs(gateway, store, plan.jobs_one_client, 1, plan.jobs_deadline_s)
        memory = [memory_per_job(before, memory_reading(gateway, store), one["succeeded"], "after 1 client's")]
        many = submit_jobs(gateway, store, plan.jobs_drain - one["succeeded"], plan.jobs_clients, plan.jobs_deadline_s)
        time.sleep(SETTLE_S)  # what the last requests left behind is freed or kept before reading
        queued = one["succeeded"] + many["succeeded"]
        label = f"after {plan.jobs_clients} clients' too"
        memory.append(memory_per_job(before, memory_reading(gateway, store), queued, label))
        last = memory[-1]
        say(f"  memory: {last['rss_bytes_per_job']} B RSS, {last['store_bytes_per_job']} B of store per job")
        first = time_first_dispatch(gateway, store, plan.jobs_first_dispatch_repeats)
        topped = top_up(gateway, store, plan.jobs_drain, plan.jobs_clients, plan.jobs_deadline_s)
        drained = drain(gateway, store, ports, plan.jobs_slots_per_server, plan.jobs_deadline_s)
        slots = plan.jobs_servers * plan.jobs_slots_per_server  # as many clients as the servers take at once
        sync = send_synchronously(gateway, plan.jobs_drain, slots, plan.jobs_deadline_s)
    results = {
        "setup": _setup(plan, topped),
        "submissions": [one, many],
        "lease": lease,
        "memory": memory,
        "first_dispatch": first,
        "drain": drained,
        "synchronous": sync,
        "drain_over_sync": ratio(drained["jobs_per_s"], sync["per_s"]),
    }
    results["aims"] = aims(results)
    return results


def _setup(plan: Plan, topped: int) -> dict[str, Any]:
    return {
        "gateway": "gunicorn -c deploy/gunicorn.conf.py app:app (1 gevent worker), LOG_LEVEL=INFO, jobs in "
        "SQLite (WAL, synchronous=FULL) on the machine's disk",
        "servers": f"{plan.jobs_servers} fake GPU servers (demo/fake_gpu_server.py, one process each), "
        f"max_concurrent={plan.jobs_slots_per_server} each",
        "job": f"POST {JOB_PATH} with a {len(JOB_BODY)}-byte JSON body; the fake echoes it at once",
        "clients": "Python threads, one kept-alive connection each",
        "drain_jobs": plan.jobs_drain,
        "sync_clients": plan.jobs_servers * plan.jobs_slots_per_server,
        "topped_up_before_drain": topped,
    }


def start_fakes(folder: Path, count: int, stack: contextlib.ExitStack) -> list[int]:
    """`count` fake GPU servers, each a process of its own; their ports."""
    ports = []
    for number in range(1, count + 1):
        port = free_port()
        argv = [sys.executable, FAKE, "--server-id", f"S{number}", "--port", str(port)]
        fake = Service(f"fake-S{number}", argv, folder / f"fake-S{number}.log", cwd=REPO)
        stack.callback(fake.stop)
        fake.wait_for_port(port)
        ports.append(port)
    return ports


def aims(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Issue 14's aims, each with this run's figure and whether it was met."""
    many = results["submissions"][-1]
    first = results["first_dispatch"]["median_first_job_ms"]
    ratio = results["drain_over_sync"]
    return [
        {
            "aim": f"≥ {AIM_SUBMISSIONS_PER_S:,.0f} durable submissions/s ({many['clients']} clients)",
            "figure": f"{many['per_s']:,.0f}/s",
            "met": many["per_s"] >= AIM_SUBMISSIONS_PER_S,
        },
        {
            "aim": f"first dispatch within {AIM_FIRST_DISPATCH_MS:.0f} ms of a registration (median)",
            "figure": f"{first} ms" if first is not None else "no job came",
            "met": first is not None and first <= AIM_FIRST_DISPATCH_MS,
        },
        {
            "aim": f"a backlog drains within {1 - AIM_DRAIN_RATIO:.0%} of synchronous throughput",
            "figure": f"drain / sync = {ratio}" if ratio is not None else "missing",
            "met": ratio is not None and ratio >= AIM_DRAIN_RATIO,
        },
    ]


if __name__ == "__main__":
    run_alone(__doc__, bench_jobs, "jobs", "small counts: about 15 s instead of 35", say_aims)
