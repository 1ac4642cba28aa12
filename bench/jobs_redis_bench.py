"""Issue 15's layout choice for jobs on Redis: submit and claim per second, three layouts, one local redis-server.

  zset + Lua (ours)   RedisJobStore: a hash per job, sorted sets as indexes, each change one script
  stream + group      XADD to submit; XREADGROUP + XACK to claim, as a consumer group hands out entries
  list + lease zset   LPUSH to submit; one script that RPOPs and ZADDs the lease to claim

redis-server runs as deployed (appendonly, appendfsync always), started here on a free port in
a temp folder and stopped by its PID. One client, then 8 threads, each op waiting for its
answer (what a submission's 202 waits for). Only ours keeps priorities, task-type filters, a
claim of one given job (the dispatcher's routing picks the job for a free server), a queue
position in O(log n) and a cancel of a queued job; the other two are the floor it is measured against.

Run:  .venv/bin/python bench/jobs_redis_bench.py [--jobs N]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gateway.cluster.connection import Redis
from gateway.jobs.records import PULL, PUSH, JobRequest, NewJob
from gateway.jobs.redis_store import RedisJobStore

BODY = b'{"image": "' + b"x" * 1000 + b'"}'  # about a kilobyte, as a small image job's JSON
POP_AND_LEASE = (
    "local id = redis.call('RPOP', KEYS[1]) if id then redis.call('ZADD', KEYS[2], ARGV[1], id) end return id"
)


def start_redis(folder: Path) -> tuple[subprocess.Popen[bytes], int]:
    server = shutil.which("redis-server")
    if server is None:
        sys.exit("redis-server is not installed: apt-get install redis-server")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    args = [server, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(folder), "--appendonly", "yes",
            "--appendfsync", "always", "--save", "", "--logfile", str(folder / "redis.log")]  # fmt: skip
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = redis.Redis(port=port)
    deadline = time.monotonic() + 10
    while True:
        try:
            client.ping()
            break
        except redis.ConnectionError:
            if time.monotonic() > deadline or process.poll() is not None:
                process.kill()
                sys.exit(f"redis-server did not start:\n{(folder / 'redis.log').read_text()[-2000:]}")
            time.sleep(0.05)
    client.close()
    return process, port


def rate(count: int, threads: int, op: Callable[[int], object]) -> float:
    """Ops per second of `op(i)` for i in range(count), from `threads` threads."""
    started = time.perf_counter()
    if threads == 1:
        for i in range(count):
            op(i)
    else:
        with concurrent.futures.ThreadPoolExecutor(threads) as pool:
            list(pool.map(op, range(count)))
    return count / (time.perf_counter() - started)


def ours(port: int, count: int, threads: int) -> tuple[float, float, float]:
    shared = Redis(f"redis://127.0.0.1:{port}/0", f"bench-{threads}:", timeout=5)
    store = RedisJobStore(shared)
    request = JobRequest("POST", "/api/enhance", (("Content-Type", "application/json"),), BODY)
    try:
        submit = rate(count, threads, lambda i: store.submit(NewJob(request, task_type="/api/", priority=i % 10)))
        claim = rate(count, threads, lambda i: store.claim_many("W1", PULL, 30, 1, ["/api/"]))
        for _ in range(count):  # the queue is empty again: fill it for the claims of given jobs
            store.submit(NewJob(request, task_type="/api/"))
        ids = [job_id for job_id, _, _ in store.queue_heads(count)]
        by_id = rate(count, threads, lambda i: store.claim_job(ids[i], "B1", PUSH, 30))
        return submit, claim, by_id
    finally:
        shared.close()


def stream(port: int, count: int, threads: int) -> tuple[float, float]:
    client = redis.Redis(port=port)
    key = f"bench-stream-{threads}"
    client.xgroup_create(key, "gateways", id="0", mkstream=True)
    try:
        submit = rate(count, threads, lambda i: client.xadd(key, {"body": BODY}))

        def claim(i: int) -> None:
            read: Any = client.xreadgroup("gateways", f"c{i % threads}", {key: ">"}, count=1)  # [[key, [(id, fields)]]]
            for _, entries in read:
                for entry_id, _ in entries:
                    client.xack(key, "gateways", entry_id)

        return submit, rate(count, threads, claim)
    finally:
        client.close()


def listed(port: int, count: int, threads: int) -> tuple[float, float]:
    client = redis.Redis(port=port)
    queue, leases = f"bench-list-{threads}", f"bench-leases-{threads}"
    pop = client.register_script(POP_AND_LEASE)
    try:
        submit = rate(count, threads, lambda i: client.lpush(queue, BODY))
        claim = rate(count, threads, lambda i: pop(keys=[queue, leases], args=[time.time() + 30]))
        return submit, claim
    finally:
        client.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--jobs", type=int, default=2000, help="ops per measurement (default 2000)")
    count = parser.parse_args().jobs
    with tempfile.TemporaryDirectory(prefix="jobs-redis-bench-") as folder:
        process, port = start_redis(Path(folder))
        try:
            for threads in (1, 8):
                submit, claim, by_id = ours(port, count, threads)
                print(f"{threads} client(s)  zset + Lua (ours)  submit {submit:8.0f}/s  claim {claim:8.0f}/s"
                      f"  claim by id {by_id:8.0f}/s")  # fmt: skip
                submit, claim = stream(port, count, threads)
                print(f"{threads} client(s)  stream + group     submit {submit:8.0f}/s  claim {claim:8.0f}/s")
                submit, claim = listed(port, count, threads)
                print(f"{threads} client(s)  list + lease zset  submit {submit:8.0f}/s  claim {claim:8.0f}/s")
        finally:
            process.terminate()
            process.wait(10)


if __name__ == "__main__":
    main()
