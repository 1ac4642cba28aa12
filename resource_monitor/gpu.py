"""GPU readings through NVML (the `pynvml` module of nvidia-ml-py, or a stand-in with its API)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from types import ModuleType
from typing import Any

log = logging.getLogger(__name__)

GPU_FIELDS = ("name", "uuid", "memory_total", "memory_used", "memory_free", "utilization", "temperature")


class GPUUnavailable(RuntimeError):
    """NVML cannot be used, or cannot list the GPUs; the message is NVML's error text."""


class GPUReader:
    """Reads every GPU's memory, utilization and temperature; one NVML session from start() to close()."""

    def __init__(self, nvml: ModuleType | None = None) -> None:
        self.nvml = nvml
        self.init_error: str | None = None
        self._initialised = False
        self._closed = False
        self._lock = threading.Lock()

    def start(self) -> bool:
        """Initialise NVML unless it already is; on failure keep the error text and return False."""
        with self._lock:
            if self._initialised:
                return True
            if self._closed:  # a request still in flight at exit must not open a session nobody closes
                self.init_error = "NVML is shut down"
                return False
            if self.nvml is None:
                try:
                    import pynvml
                except ImportError as exc:  # nvidia-ml-py not installed: a gpu monitor that says why
                    self.init_error = f"cannot import pynvml (install nvidia-ml-py): {exc}"
                    return False
                self.nvml = pynvml
            try:
                self.nvml.nvmlInit()
            except self.nvml.NVMLError as exc:
                if self.init_error != str(exc):
                    log.warning("NVML is not available: %s", exc)
                self.init_error = str(exc)
                return False
            if self.init_error is not None:
                log.info("NVML is available now")
            self.init_error = None
            self._initialised = True
            return True

    def close(self) -> None:
        """Shut NVML down, once, for good; safe to call when start() failed."""
        with self._lock:
            self._closed = True
            if not self._initialised:
                return
            self._initialised = False
            nvml: Any = self.nvml
            try:
                nvml.nvmlShutdown()
            except nvml.NVMLError as exc:
                log.warning("NVML shutdown failed: %s", exc)

    def read(self) -> list[dict[str, Any]]:
        """One entry per GPU; a field NVML cannot read is None. Raise GPUUnavailable when none can be listed."""
        # A driver loaded after the monitor started (boot order) is picked up by the next read.
        if not self.start():
            raise GPUUnavailable(self.init_error or "NVML is not initialised")
        nvml: Any = self.nvml
        try:
            count = nvml.nvmlDeviceGetCount()
        except nvml.NVMLError as exc:
            raise GPUUnavailable(str(exc)) from exc
        return [self._read_gpu(index) for index in range(count)]

    def _read_gpu(self, index: int) -> dict[str, Any]:
        nvml: Any = self.nvml
        gpu: dict[str, Any] = {"index": index, **dict.fromkeys(GPU_FIELDS)}
        handle = self._field(nvml.nvmlDeviceGetHandleByIndex, index)
        if handle is None:
            return gpu
        gpu["name"] = self._field(nvml.nvmlDeviceGetName, handle)
        gpu["uuid"] = self._field(nvml.nvmlDeviceGetUUID, handle)
        memory = self._field(nvml.nvmlDeviceGetMemoryInfo, handle)
        if memory is not None:
            gpu["memory_total"], gpu["memory_used"] = int(memory.total), int(memory.used)
            gpu["memory_free"] = int(memory.free)
        rates = self._field(nvml.nvmlDeviceGetUtilizationRates, handle)
        gpu["utilization"] = int(rates.gpu) if rates is not None else None
        gpu["temperature"] = self._field(nvml.nvmlDeviceGetTemperature, handle, nvml.NVML_TEMPERATURE_GPU)
        return gpu

    def _field(self, read: Callable[..., Any], *args: Any) -> Any:
        """What `read(*args)` returns, or None when NVML refuses (Not Supported, GPU lost, ...)."""
        nvml: Any = self.nvml
        try:
            return read(*args)
        except nvml.NVMLError as exc:
            log.debug("%s: %s", getattr(read, "__name__", "NVML"), exc)
            return None
