"""Keeps secrets out of every log line: `secret=` query values and the secret itself."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable

SECRET_PARAM = re.compile(r"(?i)((?:^|[?&\s\"'])secret=)[^&\s\"']*")
REDACTED = "[REDACTED]"


def redact(text: str, secrets: Iterable[str] = ()) -> str:
    """Replace `secret=` query values, and any known secret, with a marker."""
    text = SECRET_PARAM.sub(r"\1" + REDACTED, text)
    for secret in secrets:
        if secret:
            text = text.replace(secret, REDACTED)
    return text


class RedactingFilter(logging.Filter):
    """A handler filter that redacts each record's final message."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        super().__init__()
        self.secrets = tuple(secrets)

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = redact(message, self.secrets)
        if cleaned != message:
            record.msg, record.args = cleaned, None
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
