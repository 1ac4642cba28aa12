"""The monitor's HTTP API: /health, /resources and /check, as JSON."""

from __future__ import annotations

import atexit
import math
from types import ModuleType
from typing import Any

from flask import Blueprint, Flask, Response, current_app, jsonify, request
from werkzeug.exceptions import HTTPException

from resource_monitor.gpu import GPUReader
from resource_monitor.monitor import GIB, Monitor
from resource_monitor.settings import Settings

bp = Blueprint("monitor", __name__)


def create_app(settings: Settings | None = None, nvml: ModuleType | None = None) -> Flask:
    """Build a monitor; in gpu mode NVML (`nvml`, default the real pynvml) is initialised here."""
    settings = settings or Settings.from_env()
    app = Flask(__name__)
    gpu_reader = None
    if settings.device_type == "gpu":
        gpu_reader = GPUReader(nvml)
        gpu_reader.start()  # a failure is kept and reported by /health and /resources
        atexit.register(gpu_reader.close)
    app.extensions["resource_monitor"] = Monitor(settings, gpu_reader)
    app.register_blueprint(bp)
    app.register_error_handler(HTTPException, handle_http_exception)
    return app


def close_app(app: Flask) -> None:
    """Shut NVML down now rather than at exit (tests build many monitors)."""
    gpu_reader = monitor_of(app).gpu_reader
    if gpu_reader is not None:
        gpu_reader.close()
        atexit.unregister(gpu_reader.close)


def monitor_of(app: Flask) -> Monitor:
    monitor: Monitor = app.extensions["resource_monitor"]
    return monitor


def error_response(status: int, message: str, errors: Any = None) -> Response:
    """The project's error shape: {"success": false, "message": ..., "errors": ...}."""
    response = jsonify(success=False, message=message, errors=errors)
    response.status_code = status
    return response


def handle_http_exception(exc: HTTPException) -> Response:
    return error_response(exc.code or 500, exc.description or exc.name)


@bp.get("/health")
def health() -> tuple[Response, int]:
    """200 when this host's readings work; 503 naming the NVML error in gpu mode."""
    body, status = monitor_of(current_app).health()
    return jsonify(body), status


@bp.get("/resources")
def resources() -> Response:
    """The latest reading: CPU, memory, disk and GPUs, in bytes and percent."""
    return jsonify(monitor_of(current_app).reading())


@bp.get("/check")
def check() -> Response:
    """Whether `required_gb` GB fit under the threshold, and where."""
    raw = request.args.get("required_gb", "")
    try:
        required_gb = float(raw)
    except ValueError:
        required_gb = math.nan
    if not (math.isfinite(required_gb) and required_gb > 0):
        message = "required_gb must be a positive number of GB"
        return error_response(400, message, {"required_gb": [f"{message}, got {raw!r}"]})
    return jsonify(monitor_of(current_app).check(math.ceil(required_gb * GIB)))
