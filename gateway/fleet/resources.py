"""What a host's resource monitor reported, and what routing makes of it: fit and load score."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

GIB = 1024**3
DEFAULT_WEIGHTS = {"cpu": 0.3, "memory": 0.3, "gpu": 0.3, "disk": 0.1}


@dataclass(frozen=True)
class GPU:
    """One GPU's memory, in bytes."""

    index: int
    memory_total: int
    memory_used: int
    memory_free: int


@dataclass(frozen=True)
class Reading:
    """One /resources answer, with when the gateway received it (time.monotonic())."""

    received: float
    device_type: str
    cpu_percent: float
    memory_total: int
    memory_available: int
    memory_percent: float
    disk_percent: float
    gpus: tuple[GPU, ...] = field(default=())
    memory_threshold: float = 90.0
    gpu_memory_threshold: float = 90.0

    @property
    def gpu_memory_total(self) -> int:
        return sum(gpu.memory_total for gpu in self.gpus)

    @property
    def gpu_memory_free(self) -> int:
        return sum(gpu.memory_free for gpu in self.gpus)

    def usable_bytes(self) -> int:
        """The most memory one request can get under the thresholds: best GPU, or RAM on a cpu host."""
        if self.device_type == "gpu":
            limit = self.gpu_memory_threshold / 100
            return max((max(0, int(g.memory_total * limit) - g.memory_used) for g in self.gpus), default=0)
        used = self.memory_total - self.memory_available
        return max(0, int(self.memory_total * self.memory_threshold / 100) - used)

    def fits(self, required_bytes: int) -> bool:
        """Whether `required_bytes` fit under the threshold."""
        return self.usable_bytes() >= required_bytes

    def load_score(self, weights: dict[str, float]) -> float:
        """Seed 003's score, 0-100, lower is freer: CPU, memory, GPU memory in use (for
        "accounts"), disk. A host without GPUs scores its GPU part as RAM in use."""
        gpu_total = self.gpu_memory_total
        gpu_percent = 100 * (gpu_total - self.gpu_memory_free) / gpu_total if gpu_total else self.memory_percent
        parts = {"cpu": self.cpu_percent, "memory": self.memory_percent, "gpu": gpu_percent, "disk": self.disk_percent}
        return sum(weights.get(name, 0.0) * value for name, value in parts.items())

    def summary(self, now: float, stale_after: float) -> dict[str, Any]:
        """What GET /webhook/servers shows of it."""
        age = max(0.0, now - self.received)
        return {
            "device_type": self.device_type,
            "gpu_count": len(self.gpus),
            "gpu_memory_free": self.gpu_memory_free,
            "gpu_memory_total": self.gpu_memory_total,
            "usable_bytes": self.usable_bytes(),
            "cpu_percent": self.cpu_percent,
            "memory_percent": self.memory_percent,
            "age_s": round(age, 1),
            "stale": age > stale_after,
        }


def parse_reading(document: Any, received: float) -> Reading:
    """Build a Reading from a monitor's /resources JSON; ValueError when it is not one."""
    try:
        gpus = tuple(
            GPU(
                index=int(gpu["index"]),
                memory_total=_bytes(gpu["memory_total"]),
                memory_used=_bytes(gpu["memory_used"]),
                memory_free=_bytes(gpu["memory_free"]),
            )
            for gpu in document.get("gpus") or []
        )
        thresholds = document.get("thresholds") or {}
        return Reading(
            received=received,
            device_type="gpu" if document["device_type"] == "gpu" else "cpu",
            cpu_percent=_percent(document["cpu"]["percent"]),
            memory_total=_bytes(document["memory"]["total"]),
            memory_available=_bytes(document["memory"]["available"]),
            memory_percent=_percent(document["memory"]["percent"]),
            disk_percent=_percent(document["disk"]["percent"]),
            gpus=gpus,
            memory_threshold=_percent(thresholds.get("memory_percent", 90)),
            gpu_memory_threshold=_percent(thresholds.get("gpu_memory_percent", 90)),
        )
    except (KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"not a resource reading: missing or bad {exc}") from None


def parse_weights(raw: str) -> dict[str, float]:
    """`cpu=0.3,memory=0.3,gpu=0.3,disk=0.1` as a dict; ValueError naming the bad part."""
    weights = {}
    for item in raw.split(","):
        name, sep, value = item.partition("=")
        name = name.strip()
        if not sep or name not in DEFAULT_WEIGHTS:
            raise ValueError(f"expected name=weight pairs with names from {', '.join(DEFAULT_WEIGHTS)}; got {item!r}")
        try:
            weight = float(value)
        except ValueError:
            raise ValueError(f"weight of {name} is not a number: {value!r}") from None
        if not math.isfinite(weight) or weight < 0:
            raise ValueError(f"weight of {name} must be a finite number of at least 0")
        weights[name] = weight
    return weights


def _bytes(value: Any) -> int:
    if value is None:  # a field the GPU does not report
        return 0
    number = int(value)
    if number < 0:
        raise TypeError("negative size")
    return number


def _percent(value: Any) -> float:
    number = float(value)
    if not 0 <= number <= 100:
        raise TypeError(f"percent out of range: {number}")
    return number
