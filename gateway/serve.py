"""`gpu-gateway`: serve the gateway under gunicorn with the shipped settings (gateway/gunicorn_conf.py)."""

from __future__ import annotations

import sys

from gunicorn.app.wsgiapp import run


def main(argv: list[str] | None = None) -> None:
    """Run gunicorn on `gateway.app:app`; extra arguments (`--bind`, `--log-level`, ...) pass through."""
    args = sys.argv[1:] if argv is None else argv
    sys.argv = ["gpu-gateway", "-c", "python:gateway.gunicorn_conf", *args, "gateway.app:app"]
    run()
