"""GpuProbe (NVML through nvidia-ml-py) on a real NVIDIA GPU, checked against ``nvidia-smi``.

Every test here is skipped, with the reason, where there is no NVIDIA GPU: ``nvidia-smi`` is not on
PATH, lists no GPU, or NVML cannot be initialised. On a GPU host the probe's figures are compared
with what nvidia-smi reports at the same moment, so a probe that reads the wrong field, unit or
device fails. ``scripts/gpu-check`` runs this file on a GPU host; elsewhere it only skips.
"""

from __future__ import annotations

import functools
import shutil
import subprocess

import pynvml
import pytest

from gpu_bridge.gpu_server import create_app
from gpu_bridge.gpu_server.health import GpuProbe

pytestmark = pytest.mark.gpu

QUERY = "index,name,memory.total,memory.used,utilization.gpu,temperature.gpu"
MEMORY_TOLERANCE = 0.01  # the probe's total within 1 % of nvidia-smi's
TEMPERATURE_DRIFT_C = 15  # probe and nvidia-smi read a moment apart
NVML_CALLS = ("nvmlInit", "nvmlDeviceGetCount", "nvmlDeviceGetHandleByIndex", "nvmlDeviceGetName",
              "nvmlDeviceGetMemoryInfo", "nvmlDeviceGetUtilizationRates", "nvmlDeviceGetTemperature")


def _number(text: str):
    try:
        return int(text)
    except ValueError:
        try:
            return float(text)
        except ValueError:
            return None  # "[N/A]", "[Not Supported]"


def parse_smi(text: str) -> list[dict]:
    """Rows of ``--query-gpu=QUERY --format=csv,noheader,nounits`` (a name may hold commas)."""
    rows = []
    for line in text.splitlines():
        parts = [part.strip() for part in line.split(",")]
        if len(parts) < 6 or _number(parts[0]) is None:
            continue
        total, used, utilization, temperature = (_number(p) for p in parts[-4:])
        rows.append({"index": _number(parts[0]), "name": ", ".join(parts[1:-4]), "memory_total_mib": total,
                     "memory_used_mib": used, "utilization_percent": utilization, "temperature_c": temperature})
    return rows


def query_smi() -> list[dict]:
    result = subprocess.run(["nvidia-smi", f"--query-gpu={QUERY}", "--format=csv,noheader,nounits"],
                            capture_output=True, text=True, timeout=30, check=False)
    assert result.returncode == 0, f"nvidia-smi --query-gpu failed ({result.returncode}): {result.stderr.strip()}"
    return parse_smi(result.stdout)


def no_gpu_reason() -> str | None:
    """Why this host has no usable NVIDIA GPU, or None when it has one."""
    if shutil.which("nvidia-smi") is None:
        return "no NVIDIA GPU here: nvidia-smi is not on PATH"
    try:
        rows = query_smi()
    except (AssertionError, OSError, subprocess.TimeoutExpired) as exc:
        return f"no NVIDIA GPU here: nvidia-smi failed: {exc}"
    if not rows:
        return "no NVIDIA GPU here: nvidia-smi lists no GPU"
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        return f"no NVIDIA GPU here: NVML init failed ({exc})"
    pynvml.nvmlShutdown()  # NVML counts inits; the probes under test make their own
    return None


@pytest.fixture(scope="module")
def gpu_host():
    reason = no_gpu_reason()
    if reason:
        pytest.skip(reason)


@pytest.fixture
def smi(gpu_host):
    """nvidia-smi's view now (each test reads it right next to the probe it checks)."""
    return query_smi()


def assert_matches_smi(gpu: dict, smi: list[dict]) -> None:
    """A GpuProbe report (``snapshot()`` or ``/api/health``'s ``gpu``) agrees with nvidia-smi."""
    assert gpu["available"] is True, f"probe says no GPU: {gpu.get('error')}"
    devices = gpu["devices"]
    assert [d["index"] for d in devices] == list(range(len(devices)))
    assert len(devices) == len(smi), f"probe sees {len(devices)} GPUs, nvidia-smi {len(smi)}"
    assert [d["name"] for d in devices] == [row["name"] for row in smi]
    for device, row in zip(devices, smi, strict=True):
        assert device["index"] == row["index"]
        where = f"GPU {row['index']} ({row['name']}): {device}, nvidia-smi {row}"
        total, used = device["memory_total_bytes"], device["memory_used_bytes"]
        assert isinstance(total, int) and isinstance(used, int), where
        smi_total = row["memory_total_mib"] * 2**20
        assert abs(total - smi_total) <= MEMORY_TOLERANCE * smi_total, where
        assert 0 <= used <= total, where
        # NVML v2's used (driver reserve apart) is nvidia-smi's figure; other processes may allocate
        # between the two reads, hence a margin.
        assert abs(used - row["memory_used_mib"] * 2**20) <= MEMORY_TOLERANCE * total, where
        for key, low, high, drift in (("temperature_c", 0, 120, TEMPERATURE_DRIFT_C),
                                      ("utilization_percent", 0, 100, None)):
            value, smi_value = device[key], row[key]
            if smi_value is None:  # nvidia-smi says N/A: the board does not report it, nor can NVML
                assert value is None, f"{key}: probe {value!r} where nvidia-smi reports N/A; {where}"
                continue
            assert isinstance(value, int) and not isinstance(value, bool), f"{key}: {value!r}; {where}"
            assert low <= value <= high, f"{key} {value} outside {low}..{high}; {where}"
            if drift is not None:
                assert abs(value - smi_value) <= drift, f"{key} {value} vs nvidia-smi {smi_value}; {where}"
        reported_na = {k for k in ("temperature_c", "utilization_percent") if row[k] is None}
        if not reported_na:
            assert "error" not in device, where


def test_snapshot_matches_nvidia_smi(smi):
    assert_matches_smi(GpuProbe().snapshot(), smi)


@pytest.fixture
def nvml_calls(monkeypatch, gpu_host):
    """Counts of the NVML functions GpuProbe calls, through wrappers around the real ones."""
    counts = dict.fromkeys(NVML_CALLS, 0)

    def counting(name, real):
        @functools.wraps(real)
        def wrapper(*args, **kwargs):
            counts[name] += 1
            return real(*args, **kwargs)
        return wrapper

    for name in NVML_CALLS:
        monkeypatch.setattr(pynvml, name, counting(name, getattr(pynvml, name)))
    return counts


def test_second_snapshot_within_ttl_comes_from_the_cache(nvml_calls, smi):
    probe = GpuProbe(ttl=3600)
    first = probe.snapshot()
    after_first = dict(nvml_calls)
    assert after_first["nvmlDeviceGetCount"] == 1
    assert after_first["nvmlDeviceGetName"] == after_first["nvmlDeviceGetMemoryInfo"] == len(smi)
    second = probe.snapshot()
    assert second == first
    assert second is not first  # callers get copies, never the cached object itself
    assert nvml_calls == after_first, "NVML was queried again within the TTL"
    assert_matches_smi(second, smi)


def test_snapshot_after_ttl_queries_nvml_again(nvml_calls, smi):
    probe = GpuProbe(ttl=0)
    probe.snapshot()
    probe.snapshot()
    assert nvml_calls["nvmlInit"] == 1  # initialised once per probe
    assert nvml_calls["nvmlDeviceGetCount"] == 2
    assert nvml_calls["nvmlDeviceGetMemoryInfo"] == 2 * len(smi)


def get_with_smi(ollama_url: str, path: str, **env: str):
    """GET ``path`` from a fresh GPU server app, then read nvidia-smi: (response, smi rows)."""
    app = create_app({"GPU_BRIDGE_API_TOKEN": "gpu-check-token-0123456789", "GPU_BRIDGE_OLLAMA_URL": ollama_url,
                      **env})
    app.testing = True
    try:
        return app.test_client().get(path), query_smi()
    finally:
        app.extensions["gpu_bridge"].close()


def test_health_route_reports_the_gpu(gpu_host, module_emulator):
    response, smi = get_with_smi(module_emulator.url, "/api/health")
    assert response.status_code == 200
    body = response.get_json()
    assert body["status"] == "ok", body
    assert_matches_smi(body["gpu"], smi)


def test_metrics_route_exports_each_gpu(gpu_host, module_emulator):
    from prometheus_client.parser import text_string_to_metric_families

    response, smi = get_with_smi(module_emulator.url, "/metrics", GPU_BRIDGE_METRICS_PUBLIC="true")
    assert response.status_code == 200
    samples = {(s.name, s.labels.get("gpu")): (s.value, s.labels.get("name"))
               for family in text_string_to_metric_families(response.get_data(as_text=True))
               for s in family.samples if s.name.startswith("gpu_bridge_gpu_")}
    assert samples[("gpu_bridge_gpu_available", None)][0] == 1.0
    for row in smi:
        total, name = samples[("gpu_bridge_gpu_memory_total_bytes", str(row["index"]))]
        assert name == row["name"]
        smi_total = row["memory_total_mib"] * 2**20
        assert abs(total - smi_total) <= MEMORY_TOLERANCE * smi_total, (total, row)
