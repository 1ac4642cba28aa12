"""CPU, memory and disk readings through psutil."""

from __future__ import annotations

import logging
import os
from typing import Any

import psutil

log = logging.getLogger(__name__)


class SystemReader:
    """Reads the host's CPU, RAM and one disk; sizes in bytes, percentages 0-100."""

    def __init__(self, disk_path: str = "/") -> None:
        self.disk_path = disk_path
        # cpu_percent(interval=None) compares with the previous call; the first one has nothing to
        # compare with and answers 0.0, so make it here rather than in the first reading.
        psutil.cpu_percent(interval=None)

    def read(self) -> dict[str, Any]:
        """The `cpu`, `memory` and `disk` parts of a reading."""
        return {"cpu": self.read_cpu(), "memory": self.read_memory(), "disk": self.read_disk()}

    def read_cpu(self) -> dict[str, Any]:
        """Logical CPUs, busy percent since the previous reading, and the 1, 5 and 15 minute load."""
        return {
            "count": psutil.cpu_count(),
            "percent": psutil.cpu_percent(interval=None),
            "load_avg": [round(load, 2) for load in os.getloadavg()],
        }

    def read_memory(self) -> dict[str, Any]:
        """RAM: total, available (what new work can get), used and percent."""
        memory = psutil.virtual_memory()
        return {"total": memory.total, "available": memory.available, "used": memory.used, "percent": memory.percent}

    def read_disk(self) -> dict[str, Any]:
        """The disk holding `disk_path`; all None when it cannot be read (unmounted since the start)."""
        try:
            disk = psutil.disk_usage(self.disk_path)
        except OSError as exc:
            log.warning("cannot read disk usage of %s: %s", self.disk_path, exc)
            return {"total": None, "used": None, "free": None, "percent": None}
        return {"total": disk.total, "used": disk.used, "free": disk.free, "percent": disk.percent}
