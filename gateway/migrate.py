"""`gpu-gateway migrate --to-redis`: copy one process's embedded state into Redis, to run several.

It reads the settings as the gateway does (REDIS_URL, REDIS_PREFIX, BACKEND_SERVERS_FILE,
TASK_AFFINITY_FILE, JOB_STORE_FILE, ALLOCATION_STORE_FILE) and copies the servers, the task
owners, the jobs not yet finished, and the allocations with their history. What Redis already
holds is kept: a server registered there since is newer than the file. Stop the one-process
gateway first, so that nothing changes in the files meanwhile; running it twice copies nothing
twice.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path

from gateway.allocations.redis_store import RedisAllocationStore
from gateway.allocations.store import SQLiteAllocationStore
from gateway.cluster.connection import Redis, RedisUnavailable
from gateway.config import Config, ConfigError
from gateway.fleet.redis_store import Conflict, RedisFleetStore
from gateway.fleet.server import BackendServer
from gateway.fleet.store import JsonFileStore
from gateway.jobs.records import JobNotFound, NewJob
from gateway.jobs.redis_store import RedisJobStore
from gateway.jobs.store import SQLiteJobStore
from gateway.routing.affinity import TaskAffinity
from gateway.routing.affinity_redis import RedisTaskAffinity

Say = Callable[[str], None]


def copy_servers(config: Config, redis: Redis, say: Say, dry_run: bool) -> int:
    """Copy backend_servers.json's servers into Redis; those Redis has already stay as they are."""
    path = Path(config.backend_servers_file)
    if not path.exists():
        say(f"servers: {path} does not exist; nothing to copy")
        return 0
    store, copied = RedisFleetStore(redis), 0
    for entry in JsonFileStore(path).load():
        try:
            server = BackendServer.from_dict(entry)
        except ValueError as exc:
            say(f"servers: skipped a bad entry: {exc}")
            continue
        if dry_run:
            copied += 1
            continue
        try:
            store.put(server.server_id, server.to_entry(), 0)
        except Conflict:
            say(f"servers: {server.server_id} is in Redis already; kept Redis's record")
            continue
        copied += 1
    say(f"servers: {'would copy' if dry_run else 'copied'} {copied} from {path}")
    return copied


def copy_task_owners(config: Config, redis: Redis, say: Say, dry_run: bool) -> int:
    """Copy the task owners not yet expired, each with the time it has left; an owner Redis has already stays."""
    path = Path(config.task_affinity_file)
    if not path.exists():
        say(f"task owners: {path} does not exist; nothing to copy")
        return 0
    local = TaskAffinity(path, ttl=config.task_affinity_ttl)
    try:
        owners = local.live()
    finally:
        local.close()
    copied = len(owners)
    if not dry_run and owners:
        shared = RedisTaskAffinity(redis, ttl=config.task_affinity_ttl)
        pipe = redis.client.pipeline(transaction=False)
        for task_id, server_id, seconds_left in owners:
            pipe.set(shared.key(task_id), server_id, px=max(1, int(seconds_left * 1000)), nx=True)
        copied = sum(1 for done in redis.call("copy the task owners", pipe.execute) if done)
    say(f"task owners: {'would copy' if dry_run else 'copied'} {copied} from {path}")
    return copied


def copy_jobs(config: Config, redis: Redis, say: Say, dry_run: bool) -> int:
    """Copy the queued and running jobs, with their Idempotency-Keys; a job Redis has already stays.

    A job that was running goes back to the queue, as the one process's own restart would have
    put it: that process is stopped, and its run with it.
    """
    path = Path(config.job_store_file)
    if not path.exists():
        say(f"jobs: {path} does not exist; nothing to copy")
        return 0
    local = SQLiteJobStore(path)
    try:
        unfinished = local.unfinished()
    finally:
        local.close()
    shared = RedisJobStore(redis, max_bytes=config.job_store_max_bytes, idempotency_ttl=config.idempotency_ttl)
    copied = 0
    for job, key, fingerprint in unfinished:
        try:
            shared.get(job.job_id)
        except JobNotFound:
            pass
        else:
            say(f"jobs: {job.job_id} is in Redis already; kept Redis's")
            continue
        if not dry_run:
            new = NewJob(
                job.request, job.task_type, job.model, job.priority, key, fingerprint, job.callback_url, job.job_id
            )
            if not shared.submit(new).created:
                say(f"jobs: {job.job_id}'s Idempotency-Key names another job in Redis; kept that one")
                continue
        copied += 1
    say(f"jobs: {'would copy' if dry_run else 'copied'} {copied} queued or running from {path}")
    return copied


def copy_allocations(config: Config, redis: Redis, say: Say, dry_run: bool) -> int:
    """Copy every allocation, with its history, as it is; a key Redis holds already keeps Redis's place."""
    path = Path(config.allocation_store_file)
    if not path.exists():
        say(f"allocations: {path} does not exist; nothing to copy")
        return 0
    local = SQLiteAllocationStore(path)
    try:
        kept = list(local.everything())
    finally:
        local.close()
    shared, copied = RedisAllocationStore(redis), 0
    for allocation, history in kept:
        if dry_run:
            copied += shared.get(allocation.key) is None
        elif shared.adopt(allocation, history):
            copied += 1
        else:
            say(f"allocations: {allocation.key} is in Redis already; kept Redis's")
    say(f"allocations: {'would copy' if dry_run else 'copied'} {copied} from {path}")
    return copied


STEPS: list[Callable[[Config, Redis, Say, bool], int]] = [copy_servers, copy_task_owners, copy_jobs, copy_allocations]


def main(argv: list[str] | None = None) -> int:
    """Run the migration; the exit status is 0 when every step ran."""
    parser = argparse.ArgumentParser(prog="gpu-gateway migrate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--to-redis", action="store_true", required=True, help="copy the embedded state into Redis")
    parser.add_argument("--dry-run", action="store_true", help="say what would be copied, and copy nothing")
    args = parser.parse_args(argv)
    # The migration reads only where the state is; the webhook secret, which the gateway must
    # have, is no business of it (a stand-in passes the check when none is set).
    environ = {"WEBHOOK_SECRET": "not-used-by-migrate-0000", **os.environ}
    try:
        config = Config.from_env(environ)
    except ConfigError as exc:
        print(f"gpu-gateway migrate: {exc}", file=sys.stderr)
        return 2
    if not config.redis_url:
        print("gpu-gateway migrate: set REDIS_URL to the Redis to copy into", file=sys.stderr)
        return 2
    redis = Redis(config.redis_url, config.redis_prefix, max(config.redis_timeout, 5.0))
    try:
        for step in STEPS:
            step(config, redis, print, args.dry_run)
    except RedisUnavailable as exc:
        print(f"gpu-gateway migrate: {exc}; nothing more was copied", file=sys.stderr)
        return 1
    finally:
        redis.close()
    return 0


if __name__ == "__main__":  # `.venv/bin/python -m gateway.migrate --to-redis` in a checkout
    sys.exit(main())
