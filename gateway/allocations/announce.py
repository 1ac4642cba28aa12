"""Each move of a key, announced to ALLOCATION_MIGRATE_URL before it takes effect, signed as job callbacks are.

The receiver (the application that owns the sessions) moves what it keeps on the old server,
then answers 2xx to let the move happen; any other status, or no answer within
ALLOCATION_MIGRATE_TIMEOUT, refuses it, and the key stays where it was. The headers are
Standard Webhooks' (jobs/callbacks.py signs them): the webhook-id is the move's own id.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from typing import Any, NamedTuple

import requests

from gateway.allocations.records import Allocation, Move
from gateway.jobs.callbacks import signed_headers, signing_key

log = logging.getLogger(__name__)


class Answer(NamedTuple):
    """The receiver's verdict on one move: whether it may go ahead, the move's id, and what it answered."""

    ok: bool
    move_id: str
    detail: str


def event(move_id: str, allocation: Allocation, move: Move, urls: dict[str, str | None]) -> bytes:
    """The announcement's body: `allocation.move`, when, and the move (from where to where, and why)."""
    document: dict[str, Any] = {
        "type": "allocation.move",
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "data": {
            "move_id": move_id,
            "key": allocation.key,
            "move_type": move.type,
            "from_server_id": move.from_server_id,
            "from_url": urls.get("from"),
            "to_server_id": move.server_id,
            "to_url": urls.get("to"),
            "strategy": allocation.strategy,
            "group": allocation.group,
            "location": allocation.location,
            "load_score": move.load_score,
            "reason": move.reason,
        },
    }
    return json.dumps(document, separators=(",", ":")).encode()


class Announcer:
    """POSTs each move to the one configured URL, signed; nothing else is ever called."""

    def __init__(self, url: str, secret: str, timeout: float = 10.0) -> None:
        self.url = url
        self.key = signing_key(secret)
        self.timeout = timeout
        self.session = requests.Session()
        self.session.trust_env = False  # no proxy from the environment: the configured URL and nothing else

    def announce(self, allocation: Allocation, move: Move, urls: dict[str, str | None]) -> Answer:
        """Ask the receiver to let `move` happen; Answer.ok is False on a refusal or no answer in time."""
        move_id = uuid.uuid4().hex
        body = event(move_id, allocation, move, urls)
        headers = signed_headers(self.key, move_id, body)
        try:
            answer = self.session.post(
                self.url, data=body, headers=headers, timeout=self.timeout, allow_redirects=False
            )
            answer.close()
        except requests.RequestException as exc:
            reason = type(exc).__name__  # not its text: that holds the URL, whose query may carry a token
            log.warning(
                "move of %s to %s: ALLOCATION_MIGRATE_URL did not answer (%s)", allocation.key, move.server_id, reason
            )
            return Answer(False, move_id, f"no answer ({reason})")
        if not 200 <= answer.status_code < 300:
            log.warning("move of %s to %s refused: HTTP %d", allocation.key, move.server_id, answer.status_code)
            return Answer(False, move_id, f"HTTP {answer.status_code}")
        return Answer(True, move_id, f"HTTP {answer.status_code}")

    def close(self) -> None:
        self.session.close()
