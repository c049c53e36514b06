"""Health facts: Ollama reachability and GPU state from NVML (``nvidia-ml-py``, module ``pynvml``).

Health never fails: without a GPU or driver NVML raises (``NVMLError_LibraryNotFound``) and the
report says ``available: false`` with the reason. Each metric of each device is read separately,
so one unsupported metric (e.g. temperature on some boards) leaves the others intact.
"""

from __future__ import annotations

import copy
import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..errors import GpuBridgeError

if TYPE_CHECKING:
    from ..config import GpuServerSettings
    from ..ollama import OllamaAdapter

log = logging.getLogger(__name__)

Report = dict[str, Any]
# Health and ready must answer quickly even when Ollama hangs.
PROBE_READ_TIMEOUT = 5.0


def probe_read_timeout(settings: GpuServerSettings) -> float:
    """The read timeout of the health and ready probes: Ollama's own, capped at ``PROBE_READ_TIMEOUT``."""
    return min(settings.ollama_read_timeout, PROBE_READ_TIMEOUT)


def _text(value: object) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


class TtlCache:
    """``compute()``'s last value for ``ttl`` seconds, computed by one caller at a time; callers get
    a deep copy, so nobody can change the cached report."""

    def __init__(self, compute: Callable[[], Report], ttl: float) -> None:
        self.compute, self.ttl = compute, ttl
        self._lock = threading.Lock()
        self._value: Report | None = None
        self._at = 0.0

    def get(self) -> Report:
        with self._lock:
            if self._value is None or time.monotonic() - self._at >= self.ttl:
                self._value = self.compute()
                self._at = time.monotonic()
            return copy.deepcopy(self._value)


class GpuProbe:
    """NVML, initialised once (a failed init is retried after ``ttl``), results cached for ``ttl`` s."""

    def __init__(self, ttl: float = 5.0) -> None:
        self._initialised = False
        self._cache = TtlCache(self._probe_safely, ttl)

    def snapshot(self) -> Report:
        return self._cache.get()

    def _probe_safely(self) -> Report:
        try:
            return self._probe()
        except Exception as exc:  # noqa: BLE001 - health must never raise
            log.exception("GPU probe failed")
            return {"available": False, "devices": [], "error": f"GPU probe failed: {exc}"}

    def _probe(self) -> Report:
        try:
            import pynvml  # type: ignore[import-untyped,unused-ignore]  # nvidia-ml-py ships no type hints
        except ImportError:
            return {"available": False, "devices": [], "error": "nvidia-ml-py (pynvml) is not installed"}
        if not self._initialised:
            try:
                pynvml.nvmlInit()
            except Exception as exc:  # noqa: BLE001 - NVMLError_LibraryNotFound, DriverNotLoaded, ...
                return {"available": False, "devices": [], "error": f"NVML is not available: {exc}"}
            self._initialised = True
        try:
            count = int(pynvml.nvmlDeviceGetCount())
        except Exception as exc:  # noqa: BLE001
            return {"available": False, "devices": [], "error": f"cannot count GPUs: {exc}"}
        devices = [self._device(pynvml, index) for index in range(count)]
        report: Report = {"available": count > 0, "devices": devices}
        if count == 0:
            report["error"] = "NVML found no GPU"
        return report

    @staticmethod
    def _device(pynvml: Any, index: int) -> Report:  # Any: the untyped NVML module
        device: Report = {"index": index, "name": None, "memory_total_bytes": None, "memory_used_bytes": None,
                        "utilization_percent": None, "temperature_c": None}
        errors = []
        try:
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        except Exception as exc:  # noqa: BLE001
            device["error"] = f"cannot open GPU {index}: {exc}"
            return device
        try:
            device["name"] = _text(pynvml.nvmlDeviceGetName(handle))
        except Exception as exc:  # noqa: BLE001
            errors.append(f"name: {exc}")
        try:
            memory = _memory_info(pynvml, handle)
            device["memory_total_bytes"] = int(memory.total)
            device["memory_used_bytes"] = int(memory.used)
        except Exception as exc:  # noqa: BLE001
            errors.append(f"memory: {exc}")
        try:
            device["utilization_percent"] = int(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu)
        except Exception as exc:  # noqa: BLE001
            errors.append(f"utilization: {exc}")
        try:
            device["temperature_c"] = int(pynvml.nvmlDeviceGetTemperature(handle, pynvml.NVML_TEMPERATURE_GPU))
        except Exception as exc:  # noqa: BLE001
            errors.append(f"temperature: {exc}")
        if errors:
            device["error"] = "; ".join(errors)
        return device


def _memory_info(pynvml: Any, handle: Any) -> Any:
    """NVML's v2 memory figures when the driver has them, else v1.

    v1's ``used`` counts the memory the driver reserves for itself (615 MiB on an idle H200 with
    driver 580, where nvidia-smi says 0 MiB); v2 reports that apart, so ``used`` is what the
    operator sees in nvidia-smi. Drivers before r510 lack v2 and answer with an NVML error.
    """
    version = getattr(pynvml, "nvmlMemory_v2", None)
    if version is not None:
        try:
            return pynvml.nvmlDeviceGetMemoryInfo(handle, version=version)
        except pynvml.NVMLError:
            pass
    return pynvml.nvmlDeviceGetMemoryInfo(handle)


def ollama_status(adapter: OllamaAdapter, read_timeout: float) -> Report:
    """``{"reachable", "version", "latency_ms", "error"?}``; never raises."""
    started = time.perf_counter()
    try:
        version = adapter.version(read_timeout=read_timeout)
    except GpuBridgeError as exc:
        return {"reachable": False, "version": None, "latency_ms": None, "error": exc.message}
    except Exception as exc:  # noqa: BLE001 - health must never raise
        log.exception("Ollama probe failed")
        return {"reachable": False, "version": None, "latency_ms": None, "error": f"probe failed: {exc}"}
    return {"reachable": True, "version": version,
            "latency_ms": round((time.perf_counter() - started) * 1000, 1)}


class OllamaProbe:
    """``ollama_status`` cached for ``ttl`` seconds, one probe at a time.

    Load balancers and monitors poll ``/api/health`` often; without the cache every poll would also
    hit Ollama, and a burst of polls would become a burst of Ollama requests. One second keeps the
    answer fresh enough for liveness while bounding Ollama's probe load to one request per second.
    """

    def __init__(self, adapter: OllamaAdapter, read_timeout: float, ttl: float = 1.0) -> None:
        self._cache = TtlCache(lambda: ollama_status(adapter, read_timeout), ttl)

    def status(self) -> Report:
        return self._cache.get()
