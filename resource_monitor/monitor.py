"""The host's reading, cached for a short time, and whether a request of a given size fits."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from resource_monitor.gpu import GPUReader, GPUUnavailable
from resource_monitor.settings import Settings
from resource_monitor.system import SystemReader

GIB = 1024**3


class Monitor:
    """Takes readings of this host; polls within `cache_expire_time` share one reading."""

    def __init__(
        self,
        settings: Settings,
        gpu_reader: GPUReader | None = None,
        system_reader: SystemReader | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self.gpu_reader = gpu_reader
        self.system_reader = system_reader or SystemReader(settings.disk_path)
        self._clock = clock
        self._lock = threading.Lock()
        self._reading: dict[str, Any] | None = None
        self._taken = 0.0

    def reading(self) -> dict[str, Any]:
        """The latest reading, taken now if the cached one has expired. Callers must not change it."""
        # Held over the read on purpose: callers arriving meanwhile wait for it and share it.
        with self._lock:
            now = self._clock()
            if self._reading is None or now - self._taken >= self.settings.cache_expire_time:
                self._reading = self._take_reading()
                self._taken = now
            return self._reading

    def _take_reading(self) -> dict[str, Any]:
        reading: dict[str, Any] = {
            "device_type": self.settings.device_type,
            "hostname": socket.gethostname(),
            "timestamp": datetime.now(UTC).isoformat(timespec="milliseconds"),
            **self.system_reader.read(),
            "gpus": [],
            "thresholds": {
                "memory_percent": self.settings.memory_threshold,
                "gpu_memory_percent": self.settings.gpu_memory_threshold,
            },
        }
        if self.gpu_reader is not None:
            try:
                reading["gpus"] = self.gpu_reader.read()
            except GPUUnavailable as exc:
                reading["error"] = str(exc)
            else:
                if not reading["gpus"]:
                    reading["error"] = "NVML reports no GPUs"
        return reading

    def health(self) -> tuple[dict[str, Any], int]:
        """200 when the reading has what this device type needs; 503 with the error otherwise."""
        reading = self.reading()
        if "error" in reading:
            return {"status": "error", "device_type": reading["device_type"], "error": reading["error"]}, 503
        return {"status": "ok", "device_type": reading["device_type"]}, 200

    def check(self, required_bytes: int) -> dict[str, Any]:
        """Whether `required_bytes` fit under the threshold: on the GPU with the most usable memory,
        or in RAM on a cpu host."""
        reading = self.reading()
        if self.settings.device_type == "gpu":
            result = best_gpu(reading, self.settings.gpu_memory_threshold)
        else:
            result = ram_fit(reading, self.settings.memory_threshold)
        return {
            "fits": result["usable_bytes"] >= required_bytes and "error" not in result,
            "required_bytes": required_bytes,
            "device_type": self.settings.device_type,
            **result,
        }


def usable_bytes(total: int, used: int, threshold_percent: float) -> int:
    """What may still be filled before `used` reaches the threshold; never below 0."""
    # The same arithmetic as the gateway's resources.Reading.usable_bytes, so both agree to the byte.
    return max(0, int(total * (threshold_percent / 100)) - used)


def best_gpu(reading: dict[str, Any], threshold_percent: float) -> dict[str, Any]:
    """The GPU with the most usable memory: its index, usable and free bytes."""
    candidates = [gpu for gpu in reading["gpus"] if gpu["memory_total"] is not None and gpu["memory_used"] is not None]
    result: dict[str, Any] = {
        "gpu_index": None,
        "usable_bytes": 0,
        "free_bytes": None,
        "threshold_percent": threshold_percent,
    }
    if not candidates:
        result["error"] = reading.get("error") or "no GPU reports its memory"
        return result
    best = max(candidates, key=lambda gpu: usable_bytes(gpu["memory_total"], gpu["memory_used"], threshold_percent))
    result["gpu_index"] = best["index"]
    result["usable_bytes"] = usable_bytes(best["memory_total"], best["memory_used"], threshold_percent)
    result["free_bytes"] = best["memory_free"]
    return result


def ram_fit(reading: dict[str, Any], threshold_percent: float) -> dict[str, Any]:
    """RAM's usable and free bytes; memory in use is what is not available to new work."""
    memory = reading["memory"]
    return {
        "gpu_index": None,
        "usable_bytes": usable_bytes(memory["total"], memory["total"] - memory["available"], threshold_percent),
        "free_bytes": memory["available"],
        "threshold_percent": threshold_percent,
    }
