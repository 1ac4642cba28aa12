"""`gpu-gateway`: serve the gateway under gunicorn with the shipped settings (gateway/gunicorn_conf.py).

`gpu-gateway migrate --to-redis` copies a one-process gateway's state into Redis (gateway/migrate.py).
"""

from __future__ import annotations

import sys

from gunicorn.app.wsgiapp import run


def main(argv: list[str] | None = None) -> None:
    """Run gunicorn on `gateway.app:app`; extra arguments (`--bind`, `--log-level`, ...) pass through."""
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["migrate"]:  # `gpu-gateway migrate --to-redis`: copy the embedded state into Redis
        from gateway.migrate import main as migrate

        sys.exit(migrate(args[1:]))
    sys.argv = ["gpu-gateway", "-c", "python:gateway.gunicorn_conf", *args, "gateway.app:app"]
    run()
