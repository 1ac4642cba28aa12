"""The floor: a naive Flask gateway that forwards every request with `requests`, round-robin.

What a first attempt looks like: one module-level `requests.Session()`, the whole answer read
into memory, no failover, no streaming. Run it as the suite does:

    NAIVE_BACKENDS=http://127.0.0.1:8001,http://127.0.0.1:8002 \
        .venv/bin/gunicorn -k gevent -w 2 -b 127.0.0.1:8100 --chdir bench naive_gateway:app
"""

from __future__ import annotations

import itertools
import os

import requests
from flask import Flask, Response, request

DROPPED_HEADERS = frozenset({"host", "content-length", "connection", "transfer-encoding"})

session = requests.Session()


def create_app(backends: list[str]) -> Flask:
    """A Flask app that sends everything under /api/ to the next backend in turn."""
    app = Flask(__name__)
    rotation = itertools.cycle(backends)

    @app.route("/api/<path:path>", methods=["GET", "POST", "PUT", "DELETE"])
    def forward(path: str) -> Response:
        headers = {name: value for name, value in request.headers if name.lower() not in DROPPED_HEADERS}
        upstream = session.request(
            request.method,
            next(rotation) + request.full_path.rstrip("?"),
            data=request.get_data(),
            headers=headers,
            timeout=30,
        )
        return Response(upstream.content, upstream.status_code, content_type=upstream.headers.get("Content-Type"))

    return app


app = create_app([url.strip() for url in os.environ.get("NAIVE_BACKENDS", "").split(",") if url.strip()])
