"""Reading our gateway's output during a run: warnings, errors and the statuses it answered."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from typing import Any

LEVEL = re.compile(r"level=(WARNING|ERROR|CRITICAL)\b|\[(WARNING|ERROR|CRITICAL)\]")
STATUS = re.compile(r"logger=gateway\.request .*\bstatus=(\d{3})\b")
MESSAGE = re.compile(r'msg=("(?:[^"\\]|\\.)*"|\S+)|\[(?:WARNING|ERROR|CRITICAL)\] (.*)')
SAMPLE_CHARS = 200


class LogWatch:
    """Follows a log file; `take()` summarises what was written since the previous call."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = self._size()

    def _size(self) -> int:
        try:
            return self.path.stat().st_size
        except OSError:
            return 0

    def take(self) -> dict[str, Any]:
        """Counts of warning/error lines and of proxied statuses since the last call, with samples."""
        try:
            with open(self.path, "rb") as log_file:
                log_file.seek(self.offset)
                raw = log_file.read()
        except OSError:
            return {"unreadable": str(self.path)}
        self.offset += len(raw)
        text = raw.decode(errors="replace")
        levels: Counter[str] = Counter()
        statuses: Counter[str] = Counter()
        messages: Counter[str] = Counter()
        for line in text.splitlines():
            status = STATUS.search(line)
            if status:
                statuses[status.group(1)] += 1
            level = LEVEL.search(line)
            if level:
                levels[level.group(1) or level.group(2)] += 1
                messages[_message(line)] += 1
        return {
            "levels": dict(levels),
            "statuses": dict(statuses),
            "top_messages": [{"count": n, "message": m} for m, n in messages.most_common(5)],
        }


def _message(line: str) -> str:
    """The message of a log line, with numbers blanked so that repeats group together."""
    found = MESSAGE.search(line)
    text = (found.group(1) or found.group(2) or line) if found else line
    return re.sub(r"\d+", "N", text.strip('"'))[:SAMPLE_CHARS]
