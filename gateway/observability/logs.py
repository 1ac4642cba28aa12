"""Where logs go and how a line looks: one event per line, key=value or JSON, secrets redacted."""

from __future__ import annotations

import json
import logging
import logging.handlers
import math
import os
import re
import sys
from datetime import UTC, datetime
from typing import Any

from gateway.observability import redaction

# Loggers with a file of their own under LOG_DIR (they also reach app.log through the root).
TOPIC_FILES = {
    "gateway.request": "request.log",
    "gateway.performance": "performance.log",
    "gateway.health": "health.log",
}
_MARK = "_gateway_handler"  # handlers this module made, replaced when the app is configured again


_PLAIN = re.compile(r'[^ "=]+')  # a value that needs no quotes


class StructuredFormatter(logging.Formatter):
    """`ts=… level=… logger=… msg="…" key=value…`, or the same as one JSON object."""

    def __init__(self, style: str = "kv") -> None:
        super().__init__()
        self.json = style == "json"

    def format(self, record: logging.LogRecord) -> str:
        fields: dict[str, Any] = {
            "ts": _timestamp(record.created),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
            **getattr(record, "fields", {}),
        }
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            fields["exc"] = record.exc_text
        if self.json:  # ensure_ascii: U+2028, NEL and control characters come out escaped
            return json.dumps(fields, ensure_ascii=True, default=str)
        return " ".join(f"{key}={_kv_value(value)}" for key, value in fields.items())


_second: tuple[int, str] = (-1, "")  # the last whole second formatted, and its text up to the seconds


def _timestamp(created: float) -> str:
    """`created` as ISO 8601 in UTC to the millisecond, as datetime.isoformat writes it, faster.

    Every proxied request logs a line; the date and time part is formatted once a second.
    """
    fraction, whole = math.modf(created)  # rounded as datetime.fromtimestamp rounds
    global _second
    second, micros = divmod(int(whole) * 1_000_000 + round(fraction * 1_000_000), 1_000_000)
    cached = _second  # read once: another thread may replace it meanwhile
    if cached[0] != second:
        cached = _second = (second, datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%dT%H:%M:%S"))
    return f"{cached[1]}.{micros // 1000:03d}+00:00"


def _kv_value(value: Any) -> str:
    if type(value) in (int, float):  # digits, a sign, a point, an exponent, inf or nan: never quoted
        return str(value)
    text = value if isinstance(value, str) else str(value)
    if text.isprintable() and _PLAIN.fullmatch(text):
        return text
    return json.dumps(text, ensure_ascii=True)  # one line whatever the request path held


def configure(level: str, style: str, log_dir: str, max_bytes: int, backups: int, secrets: list[str]) -> None:
    """Log to stdout (journald under systemd) and, with `log_dir`, to five rotating files."""
    # Our lines name no source file, thread or multiprocessing process: skip the work that finds
    # them for every record, as the logging HOWTO's "Optimization" section describes. (Process
    # ids stay: gunicorn's lines use them.)
    logging._srcfile = None
    logging.logThreads = False
    logging.logMultiprocessing = False
    root = logging.getLogger()
    for handler in [h for h in root.handlers if getattr(h, _MARK, False)]:
        root.removeHandler(handler)
        handler.close()
    for name in TOPIC_FILES:
        topic = logging.getLogger(name)
        for handler in [h for h in topic.handlers if getattr(h, _MARK, False)]:
            topic.removeHandler(handler)
            handler.close()
    formatter = StructuredFormatter(style)
    redacting = redaction.RedactingFilter(secrets)
    if not root.handlers:  # under gunicorn or pytest, leave their handlers be, and add ours beside
        _add(root, logging.StreamHandler(sys.stdout), formatter, redacting)
    if log_dir:
        os.makedirs(log_dir, exist_ok=True)

        def rotating(name: str) -> logging.Handler:
            path = os.path.join(log_dir, name)
            return logging.handlers.RotatingFileHandler(path, maxBytes=max_bytes, backupCount=backups, encoding="utf-8")

        _add(root, rotating("app.log"), formatter, redacting)
        _add(root, rotating("error.log"), formatter, redacting, level=logging.ERROR)
        for name, filename in TOPIC_FILES.items():
            _add(logging.getLogger(name), rotating(filename), formatter, redacting)
    root.setLevel(level)
    logging.getLogger("apscheduler").setLevel(logging.WARNING)  # it logs every run at INFO
    names = ("", "werkzeug", "gunicorn.error", "gunicorn.access")
    redaction.install(secrets, [logging.getLogger(name) for name in names])


def _add(
    logger: logging.Logger,
    handler: logging.Handler,
    formatter: logging.Formatter,
    redacting: logging.Filter,
    level: int = logging.NOTSET,
) -> None:
    setattr(handler, _MARK, True)
    handler.setFormatter(formatter)
    handler.addFilter(redacting)
    handler.setLevel(level)
    logger.addHandler(handler)
