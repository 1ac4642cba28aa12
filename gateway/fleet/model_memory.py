"""What a model needs in memory (MODEL_MEMORY_GB, a server's `model_memory_gb`) and what a server has loaded."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from gateway.fleet.model_discovery import is_model_name

MAX_MODEL_GB = 100_000  # a need past this is a typo, not a model
DEVICE_TYPES = ("cpu", "gpu")  # seed 001's `type`, lower case (the seed wrote CPU and GPU)
MAX_DESCRIPTION = 1000


def model_key(name: str) -> str:
    """The name models are matched by: Ollama's `llama3` is `llama3:latest`."""
    return name if ":" in name.rsplit("/", 1)[-1] else name + ":latest"


@dataclass(frozen=True)
class LoadedModel:
    """A model a server has in memory, as its Ollama GET /api/ps said, and when the sweep first read it so."""

    name: str
    size_vram: int  # bytes of GPU memory it holds there
    read_at: str  # ISO 8601: the sweep that first read it loaded at this size; later equal reads keep it

    def as_dict(self) -> dict[str, Any]:
        """The record's JSON shape."""
        return {"name": self.name, "size_vram": self.size_vram, "read_at": self.read_at}


def is_gigabytes(value: Any) -> bool:
    """A JSON number of GB above 0 and at most MAX_MODEL_GB (not a boolean)."""
    return (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and math.isfinite(value)
        and 0 < value <= MAX_MODEL_GB
    )


def is_need_map(value: Any) -> bool:
    """A `model_memory_gb` as a record keeps it: model name -> GB."""
    return isinstance(value, dict) and all(is_model_name(k) and is_gigabytes(v) for k, v in value.items())


def parse_model_memory(raw: str) -> dict[str, float]:
    """MODEL_MEMORY_GB, `qwen3:14b=24,llama3:8b=8`, as a dict; ValueError naming the bad part."""
    needs: dict[str, float] = {}
    seen: dict[str, str] = {}
    for item in raw.split(","):
        if not item.strip():
            continue
        name, sep, value = item.strip().rpartition("=")
        name = name.strip()
        if not sep or not is_model_name(name):
            raise ValueError(f"expected model=GB pairs, such as qwen3:14b=24; got {item.strip()!r}")
        try:
            gigabytes = float(value)
        except ValueError:
            raise ValueError(f"the GB of {name} is not a number: {value.strip()!r}") from None
        if not is_gigabytes(gigabytes):
            raise ValueError(f"the GB of {name} must be above 0 and at most {MAX_MODEL_GB}")
        key = model_key(name)
        if key in seen:
            raise ValueError(f"{name} is given twice (as {seen[key]!r} too)")
        seen[key] = name
        needs[name] = gigabytes
    if not needs:
        raise ValueError("expected model=GB pairs, such as qwen3:14b=24,llama3:8b=8")
    return needs


def still_loaded(kept: list[LoadedModel], read: list[tuple[str, int]], now: str) -> list[LoadedModel]:
    """The models `read` names, keeping the entries of `kept` that it names at the same size (and their times)."""
    known = {(model.name, model.size_vram): model for model in kept}
    return [known.get((name, size)) or LoadedModel(name, size, now) for name, size in read]


def loaded_from(value: Any) -> list[LoadedModel]:
    """A record's `loaded_models` from the state file or Redis; bad entries are dropped."""
    if not isinstance(value, list):
        return []
    models = []
    for entry in value:
        if not isinstance(entry, dict):
            continue
        name, size, read_at = entry.get("name"), entry.get("size_vram"), entry.get("read_at")
        if is_model_name(name) and isinstance(size, int) and not isinstance(size, bool) and size >= 0:
            models.append(LoadedModel(name, size, read_at if isinstance(read_at, str) else ""))
    return models
