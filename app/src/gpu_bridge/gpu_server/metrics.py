"""Prometheus metrics, in a registry of the app's own (several apps in one test process never collide)."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric

from ..jobs import Job
from ..pull_job import PULL

_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 120.0, 600.0)


class GpuCollector:
    """Per-GPU gauges from the health probe's NVML snapshot (cached by the probe, so scrapes are cheap).

    A figure the board does not report (None in the snapshot) is left out rather than exported as 0.
    """

    _SERIES = (
        ("gpu_bridge_gpu_memory_total_bytes", "GPU memory in total", "memory_total_bytes"),
        ("gpu_bridge_gpu_memory_used_bytes", "GPU memory in use (without the driver's reserve where NVML "
                                             "reports it apart)", "memory_used_bytes"),
        ("gpu_bridge_gpu_utilization_percent", "GPU busy time over NVML's last sample period",
         "utilization_percent"),
        ("gpu_bridge_gpu_temperature_celsius", "GPU die temperature", "temperature_c"),
    )

    def __init__(self, snapshot: Callable[[], dict[str, Any]]) -> None:
        self.snapshot = snapshot

    def describe(self) -> list[Metric]:
        return []  # the series depend on the GPUs found at scrape time

    def collect(self) -> Iterator[Metric]:
        report = self.snapshot()
        available = GaugeMetricFamily("gpu_bridge_gpu_available", "1 when NVML reports at least one GPU, else 0")
        available.add_metric([], 1.0 if report.get("available") else 0.0)
        yield available
        for name, help_text, key in self._SERIES:
            family = GaugeMetricFamily(name, help_text, labels=["gpu", "name"])
            for device in report.get("devices", []):
                value = device.get(key)
                if value is not None:
                    family.add_metric([str(device.get("index")), str(device.get("name") or "")], float(value))
            yield family


class LoadedModelsCollector:
    """Per-model gauges of what Ollama holds in memory (``/api/ps``), read at scrape time.

    ``loaded()`` is ``GpuService.loaded_snapshot``: a short cache, asked with the health probe's read
    timeout, so a scrape never waits longer on a hung Ollama; None when Ollama did not answer, and
    then no per-model series at all (``gpu_bridge_ollama_up`` says why). A model that was unloaded
    has no series on the next scrape: nothing is remembered between scrapes.
    """

    def __init__(self, loaded: Callable[[], list[dict[str, Any]] | None]) -> None:
        self.loaded = loaded

    def describe(self) -> list[Metric]:
        return []  # the series depend on the models loaded at scrape time

    def collect(self) -> Iterator[Metric]:
        models = self.loaded() or []
        loaded = GaugeMetricFamily("gpu_bridge_model_loaded", "1 for each model Ollama holds in memory",
                                   labels=["model"])
        vram = GaugeMetricFamily("gpu_bridge_model_vram_bytes", "Bytes of a loaded model in GPU memory",
                                 labels=["model"])
        spill = GaugeMetricFamily("gpu_bridge_model_cpu_spill", "1 when part of a loaded model is in system "
                                  "memory (size_vram < size: it runs slower), else 0", labels=["model"])
        for model in models:
            name = str(model.get("name") or "")
            loaded.add_metric([name], 1.0)
            vram.add_metric([name], float(model.get("size_vram") or 0))
            spill.add_metric([name], 1.0 if model.get("cpu_spill") else 0.0)
        yield loaded
        yield vram
        yield spill


class Metrics:
    def __init__(self, *, pull_counts: Callable[[], dict[str, Any]], ollama_up: Callable[[], bool],
                 gpu_snapshot: Callable[[], dict[str, Any]] | None = None,
                 loaded_models: Callable[[], list[dict[str, Any]] | None] | None = None) -> None:
        """``pull_counts()`` → ``{"running", "queued"}``; ``ollama_up()`` → bool; ``gpu_snapshot()`` →
        GpuProbe's report; ``loaded_models()`` → ``GpuService.loaded_snapshot()`` (all called at scrape
        time)."""
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter("gpu_bridge_http_requests_total", "HTTP requests by route (URL rule) and status",
                                ["method", "route", "status"], registry=self.registry)
        self.latency = Histogram("gpu_bridge_http_request_duration_seconds", "HTTP request duration by route",
                                 ["method", "route"], buckets=_BUCKETS, registry=self.registry)
        Gauge("gpu_bridge_pulls_in_flight", "Pulls running now", registry=self.registry).set_function(
            lambda: pull_counts()["running"])
        Gauge("gpu_bridge_pulls_queued", "Pulls waiting for a slot", registry=self.registry).set_function(
            lambda: pull_counts()["queued"])
        Gauge("gpu_bridge_ollama_up", "1 when Ollama answers, else 0 (health's probe, at most 1 s old)",
              registry=self.registry).set_function(lambda: 1.0 if ollama_up() else 0.0)
        if gpu_snapshot is not None:
            self.registry.register(GpuCollector(gpu_snapshot))
        if loaded_models is not None:
            self.registry.register(LoadedModelsCollector(loaded_models))
        self.pulls_finished = Counter("gpu_bridge_pulls_finished_total", "Finished pull jobs by final state",
                                      ["state"], registry=self.registry)
        self._finished_ids: OrderedDict[str, None] = OrderedDict()
        self._lock = threading.Lock()

    def observe_request(self, method: str, route: str, status: int, seconds: float) -> None:
        self.requests.labels(method, route, str(status)).inc()
        self.latency.labels(method, route).observe(seconds)

    def job_changed(self, job: Job) -> None:
        """JobManager's ``on_change``: count each pull once, when it reaches a final state."""
        if not job.finished or job.kind != PULL:
            return
        with self._lock:
            if job.id in self._finished_ids:
                return
            self._finished_ids[job.id] = None
            while len(self._finished_ids) > 10_000:
                self._finished_ids.popitem(last=False)
        self.pulls_finished.labels(job.state).inc()

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
