"""Keeps secrets out of every log line: `secret=`-style parameter values and the secrets themselves."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping
from typing import Any

# `secret=`, `token=`, `client_secret=`, `api_key=`, ... after `?`, `&`, `;` (a matrix parameter),
# `/`, a space or a quote. The value runs to the next `&`, `;`, space or quote: in a path the rest
# may still be the value, a `/` unescaped.
SECRET_PARAM = re.compile(r"(?i)((?:^|[?&;/\s\"'])[\w.-]*(?:secret|token|password|passwd|api[_-]?key)=)[^&;\s\"']*")
REDACTED = "[REDACTED]"
_PLAIN_TYPES = (int, float, bool, type(None))  # hold no text, so never a secret


def redact(text: str, secrets: Iterable[str] = ()) -> str:
    """Replace `secret=`-style parameter values, and any known secret, with a marker."""
    if "=" in text:  # most lines have none: skip the regex
        text = SECRET_PARAM.sub(r"\1" + REDACTED, text)
    for secret in secrets:
        if secret:
            text = text.replace(secret, REDACTED)
    return text


def redact_fields(fields: Mapping[str, Any], secrets: Iterable[str] = ()) -> Mapping[str, Any]:
    """`fields` with each value redacted as text; `fields` itself when none needed it."""
    cleaned: dict[str, Any] | None = None
    for key, value in fields.items():
        if type(value) in _PLAIN_TYPES:
            continue
        text = value if type(value) is str else str(value)
        redacted = redact(text, secrets)
        if redacted != text:
            cleaned = dict(fields) if cleaned is None else cleaned  # the caller's dict may be logged again
            cleaned[key] = redacted
    return fields if cleaned is None else cleaned


class RedactingFilter(logging.Filter):
    """A handler filter that redacts each record's final message, its structured fields and its traceback."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        super().__init__()
        self.secrets = tuple(secrets)

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = redact(message, self.secrets)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        fields = getattr(record, "fields", None)
        if fields:
            record.fields = redact_fields(fields, self.secrets)
        if record.exc_info and not record.exc_text:
            record.exc_text = _FORMATTER.formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text, self.secrets)
        if record.stack_info:
            record.stack_info = redact(record.stack_info, self.secrets)
        return True


_FORMATTER = logging.Formatter()


def install(secrets: Iterable[str], loggers: Iterable[logging.Logger]) -> None:
    """Put one RedactingFilter on every handler of the given loggers (once each)."""
    secrets = tuple(secrets)
    for logger in loggers:
        for handler in logger.handlers:
            for existing in handler.filters:
                if isinstance(existing, RedactingFilter):
                    existing.secrets = tuple(set(existing.secrets) | set(secrets))
                    break
            else:
                handler.addFilter(RedactingFilter(secrets))
