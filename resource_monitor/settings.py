"""The monitor's settings, from MONITOR_* environment variables named after the seed's config.yaml keys."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

DEVICE_TYPES = ("cpu", "gpu")
DEFAULT_PORTS = {"cpu": 8005, "gpu": 8006}


class SettingsError(ValueError):
    """A setting has a bad value; the message names the variable."""


@dataclass(frozen=True)
class Settings:
    """What the monitor reads and how it judges a fit. Build it with `Settings.from_env()`."""

    device_type: str = "cpu"
    memory_threshold: float = 90.0  # percent of RAM a cpu host may fill
    gpu_memory_threshold: float = 90.0  # percent of a GPU's memory a gpu host may fill
    cache_expire_time: float = 2.0  # seconds a reading is served again; routing needs fresh data
    disk_path: str = "/"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Read MONITOR_* from `environ` (default: os.environ); keyword overrides win."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {
            "memory_threshold": _percent(env, "MONITOR_MEMORY_THRESHOLD", cls.memory_threshold),
            "gpu_memory_threshold": _percent(env, "MONITOR_GPU_MEMORY_THRESHOLD", cls.gpu_memory_threshold),
            "cache_expire_time": _seconds(env, "MONITOR_CACHE_EXPIRE_TIME", cls.cache_expire_time),
            "disk_path": _directory(env, "MONITOR_DISK_PATH", cls.disk_path),
        }
        values.update(overrides)
        if values.get("device_type", cls.device_type) not in DEVICE_TYPES:
            raise SettingsError(f"device type must be one of {', '.join(DEVICE_TYPES)}")
        return cls(**values)


def _number(env: Mapping[str, str], name: str, default: float) -> float:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise SettingsError(f"{name} must be a number, got {raw!r}") from None
    if not math.isfinite(value):
        raise SettingsError(f"{name} must be a finite number, got {raw!r}")
    return value


def _percent(env: Mapping[str, str], name: str, default: float) -> float:
    value = _number(env, name, default)
    if not 0 < value <= 100:
        raise SettingsError(f"{name} must be a percentage above 0 and at most 100, got {value:g}")
    return value


def _seconds(env: Mapping[str, str], name: str, default: float) -> float:
    value = _number(env, name, default)
    if not 0 <= value <= 3600:
        raise SettingsError(f"{name} must be from 0 (no cache) to 3600 seconds, got {value:g}")
    return value


def _directory(env: Mapping[str, str], name: str, default: str) -> str:
    path = env.get(name, "") or default
    if not os.path.isdir(path):
        raise SettingsError(f"{name} must be an existing directory (the disk to report), got {path!r}")
    return path
