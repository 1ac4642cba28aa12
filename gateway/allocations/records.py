"""An allocation, one entry of its history, and the refusals the allocation calls answer with."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, fields
from datetime import UTC, datetime
from typing import Any

STRATEGIES = ("load_balance", "location", "affinity", "isolation")
MOVE_TYPES = ("initial", "rebalance", "manual", "failover")
OUTCOMES = ("applied", "refused")  # refused: the migrate webhook said no, and the key stayed
# Safe in a URL path, a header and a Redis key: letters, digits and . _ : @ + = ~ -
KEY_PATTERN = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9._:@+=~-]{0,199}\Z")
RESERVED_KEYS = frozenset({"history", "rebalance"})  # /allocations/history and /rebalance are routes
LOCATION_LABEL = "location"  # the server label the location strategy reads
HISTORY_LIMIT = 100  # entries kept per key, the newest
RELEASED_HISTORY_SECONDS = 7 * 86400  # a released key's history is kept this long


def stamp() -> str:
    """Now, as ISO 8601 UTC with milliseconds: history entries of one second keep their order."""
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def key_problem(key: str) -> str | None:
    """Why `key` cannot be an allocation key, or None when it can."""
    if not KEY_PATTERN.fullmatch(key):
        return "must be 1-200 characters of A-Z a-z 0-9 . _ : @ + = ~ -, starting with a letter or digit."
    if key in RESERVED_KEYS:
        return f"{key!r} is reserved: /allocations/{key} is a route of its own."
    return None


@dataclass(frozen=True)
class Allocation:
    """One key pinned to one server, with the rule it was placed by."""

    key: str
    server_id: str
    strategy: str = "load_balance"
    group: str | None = None
    location: str | None = None
    created_at: str = ""
    updated_at: str = ""

    def to_dict(self) -> dict[str, Any]:
        """The reply's (and Redis's) shape."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Allocation:
        return cls(**{name: data[name] for name in ALLOCATION_FIELDS if name in data})


ALLOCATION_FIELDS = tuple(f.name for f in fields(Allocation))


@dataclass(frozen=True)
class Move:
    """One entry of a key's history: where it went (or would have), from where, why, and the score then."""

    key: str
    type: str  # initial, rebalance, manual or failover
    server_id: str  # where it went, or was to go
    from_server_id: str | None = None
    load_score: float | None = None  # the chosen server's allocation score when it was chosen
    strategy: str = "load_balance"
    reason: str = ""
    outcome: str = "applied"
    move_id: str | None = None  # the webhook-id of its announcement, when ALLOCATION_MIGRATE_URL is set
    created_at: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Move:
        return cls(**{name: data[name] for name in MOVE_FIELDS if name in data})


MOVE_FIELDS = tuple(f.name for f in fields(Move))


class AllocationError(Exception):
    """A refusal with its HTTP status; `field` names the body's field at fault (a 400)."""

    status = 400

    def __init__(self, message: str, field: str | None = None, status: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field
        if status is not None:
            self.status = status


class NoRoom(AllocationError):
    """No server that may take the key has room (or is up): the fleet may grow, or keys go."""

    status = 503


class UnknownKey(AllocationError):
    """No allocation has that key."""

    status = 404


class Moving(AllocationError):
    """Another move of the key is under way (in this process or another)."""

    status = 409


class Refused(AllocationError):
    """ALLOCATION_MIGRATE_URL refused the move (or did not answer in time): the key stayed."""

    status = 502
