"""A stand-in for nvidia-ml-py's `pynvml` module: the calls the resource monitor makes, with the
real names, error classes and error texts, over two made-up GPUs.

Put `tests/fakes` first on PYTHONPATH and `import pynvml` finds this. Tests that import it
directly can change GPUS, FAIL_INIT and the per-function counts in `calls`.

- GPU 0 has 24 GiB with 4 GiB used; GPU 1 has 16 GiB with 12 GiB used, and its temperature
  is Not Supported.
- FAKE_NVML_FAIL_INIT=1 (or FAIL_INIT = True) makes nvmlInit fail as it does without a driver.
- FAKE_NVML_GPUS="24:4,16:12" sets the GPUs' total and used memory in GiB.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass
from typing import Any

GIB = 1024**3

# The real module's constants.
NVML_SUCCESS = 0
NVML_ERROR_UNINITIALIZED = 1
NVML_ERROR_INVALID_ARGUMENT = 2
NVML_ERROR_NOT_SUPPORTED = 3
NVML_ERROR_NO_PERMISSION = 4
NVML_ERROR_DRIVER_NOT_LOADED = 9
NVML_ERROR_LIBRARY_NOT_FOUND = 12
NVML_ERROR_GPU_IS_LOST = 15
NVML_ERROR_UNKNOWN = 999
NVML_TEMPERATURE_GPU = 0


class NVMLError(Exception):
    """As in pynvml: NVMLError(code) builds the subclass for that code; str() is NVML's text."""

    _valClassMapping: dict[int, type[NVMLError]] = {}
    _errcode_to_string = {
        NVML_ERROR_UNINITIALIZED: "Uninitialized",
        NVML_ERROR_INVALID_ARGUMENT: "Invalid Argument",
        NVML_ERROR_NOT_SUPPORTED: "Not Supported",
        NVML_ERROR_NO_PERMISSION: "Insufficient Permissions",
        NVML_ERROR_DRIVER_NOT_LOADED: "Driver Not Loaded",
        NVML_ERROR_LIBRARY_NOT_FOUND: "NVML Shared Library Not Found",
        NVML_ERROR_GPU_IS_LOST: "GPU is lost",
        NVML_ERROR_UNKNOWN: "Unknown Error",
    }
    value: int

    def __new__(cls, value: int) -> NVMLError:
        if cls is NVMLError:
            cls = NVMLError._valClassMapping.get(value, cls)
        obj = Exception.__new__(cls)
        obj.value = value
        return obj

    def __str__(self) -> str:
        return self._errcode_to_string.get(self.value, f"NVML Error with code {self.value}")


def _error_class(name: str, code: int) -> type[NVMLError]:
    def new(cls: type[NVMLError], *args: Any) -> NVMLError:
        return NVMLError.__new__(cls, code)

    error_class = type(name, (NVMLError,), {"__new__": new})
    NVMLError._valClassMapping[code] = error_class
    return error_class


NVMLError_Uninitialized = _error_class("NVMLError_Uninitialized", NVML_ERROR_UNINITIALIZED)
NVMLError_InvalidArgument = _error_class("NVMLError_InvalidArgument", NVML_ERROR_INVALID_ARGUMENT)
NVMLError_NotSupported = _error_class("NVMLError_NotSupported", NVML_ERROR_NOT_SUPPORTED)
NVMLError_NoPermission = _error_class("NVMLError_NoPermission", NVML_ERROR_NO_PERMISSION)
NVMLError_DriverNotLoaded = _error_class("NVMLError_DriverNotLoaded", NVML_ERROR_DRIVER_NOT_LOADED)
NVMLError_LibraryNotFound = _error_class("NVMLError_LibraryNotFound", NVML_ERROR_LIBRARY_NOT_FOUND)
NVMLError_GpuIsLost = _error_class("NVMLError_GpuIsLost", NVML_ERROR_GPU_IS_LOST)
NVMLError_Unknown = _error_class("NVMLError_Unknown", NVML_ERROR_UNKNOWN)


@dataclass
class c_nvmlMemory_t:  # the real structures' names
    total: int
    free: int
    used: int


@dataclass
class c_nvmlUtilization_t:
    gpu: int
    memory: int


@dataclass
class FakeGPU:
    """One GPU; a field named in `unsupported` raises NVMLError_NotSupported."""

    name: str
    uuid: str
    memory_total: int
    memory_used: int
    utilization: int = 0
    temperature: int = 40
    unsupported: frozenset[str] = frozenset()


def default_gpus() -> list[FakeGPU]:
    """GPU 0 with 20 GiB free, GPU 1 with 4 GiB free and no temperature sensor; or FAKE_NVML_GPUS."""
    spec = os.environ.get("FAKE_NVML_GPUS")
    if spec:
        sizes = [tuple(int(part) for part in item.split(":")) for item in spec.split(",")]
        return [
            FakeGPU(f"Fake GPU {i}", f"GPU-fake-{i}", total * GIB, used * GIB) for i, (total, used) in enumerate(sizes)
        ]
    return [
        FakeGPU("NVIDIA Fake A100", "GPU-00000000-fake-0000-0000-000000000000", 24 * GIB, 4 * GIB, 35, 51),
        FakeGPU(
            "NVIDIA Fake T4",
            "GPU-11111111-fake-1111-1111-111111111111",
            16 * GIB,
            12 * GIB,
            80,
            unsupported=frozenset({"temperature"}),
        ),
    ]


GPUS: list[FakeGPU] = default_gpus()
FAIL_INIT = os.environ.get("FAKE_NVML_FAIL_INIT") == "1"
INIT_ERROR: type[NVMLError] = NVMLError_LibraryNotFound  # what a failed init raises
calls: Counter[str] = Counter()  # calls per function name, to see what a reading cost
_initialised = 0  # like NVML, init and shutdown are reference-counted


def _count(name: str) -> None:
    calls[name] += 1
    if not _initialised:
        raise NVMLError_Uninitialized()


def _gpu(handle: Any, field: str) -> FakeGPU:
    gpu: FakeGPU = handle
    if field in gpu.unsupported:
        raise NVMLError_NotSupported()
    return gpu


def nvmlInit() -> None:
    global _initialised
    calls["nvmlInit"] += 1
    if FAIL_INIT:
        raise INIT_ERROR()
    _initialised += 1


def nvmlShutdown() -> None:
    global _initialised
    _count("nvmlShutdown")
    _initialised -= 1


def nvmlDeviceGetCount() -> int:
    _count("nvmlDeviceGetCount")
    return len(GPUS)


def nvmlDeviceGetHandleByIndex(index: int) -> FakeGPU:
    _count("nvmlDeviceGetHandleByIndex")
    if not 0 <= index < len(GPUS):
        raise NVMLError_InvalidArgument()
    return GPUS[index]


def nvmlDeviceGetName(handle: Any) -> str:
    _count("nvmlDeviceGetName")
    return _gpu(handle, "name").name


def nvmlDeviceGetUUID(handle: Any) -> str:
    _count("nvmlDeviceGetUUID")
    return _gpu(handle, "uuid").uuid


def nvmlDeviceGetMemoryInfo(handle: Any, version: Any = None) -> c_nvmlMemory_t:
    _count("nvmlDeviceGetMemoryInfo")
    gpu = _gpu(handle, "memory")
    return c_nvmlMemory_t(total=gpu.memory_total, free=gpu.memory_total - gpu.memory_used, used=gpu.memory_used)


def nvmlDeviceGetUtilizationRates(handle: Any) -> c_nvmlUtilization_t:
    _count("nvmlDeviceGetUtilizationRates")
    return c_nvmlUtilization_t(gpu=_gpu(handle, "utilization").utilization, memory=0)


def nvmlDeviceGetTemperature(handle: Any, sensor: int) -> int:
    _count("nvmlDeviceGetTemperature")
    if sensor != NVML_TEMPERATURE_GPU:
        raise NVMLError_InvalidArgument()
    return _gpu(handle, "temperature").temperature
