"""`gpu-gateway migrate --to-redis`: copy one process's embedded state into Redis, to run several.

It reads the settings as the gateway does (REDIS_URL, REDIS_PREFIX, BACKEND_SERVERS_FILE,
TASK_AFFINITY_FILE, JOB_STORE_FILE) and copies the servers, the task owners and the jobs not
yet finished. What Redis already holds is kept: a server registered there since is newer than
the file. Stop the one-process gateway first, so that nothing changes in the files meanwhile;
running it twice copies nothing twice.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from gateway.cluster.connection import Redis, RedisUnavailable
from gateway.config import Config, ConfigError
from gateway.fleet.redis_store import Conflict, RedisFleetStore
from gateway.fleet.server import BackendServer
from gateway.fleet.store import JsonFileStore

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


STEPS: list[Callable[[Config, Redis, Say, bool], int]] = [copy_servers]


def main(argv: list[str] | None = None) -> int:
    """Run the migration; the exit status is 0 when every step ran."""
    parser = argparse.ArgumentParser(prog="gpu-gateway migrate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--to-redis", action="store_true", required=True, help="copy the embedded state into Redis")
    parser.add_argument("--dry-run", action="store_true", help="say what would be copied, and copy nothing")
    args = parser.parse_args(argv)
    try:
        config = Config.from_env()
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
