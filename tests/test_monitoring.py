"""monitoring/: every metric the alerting rules, their promtool fixtures and the Grafana dashboard name
is one the code exports; every alert has a promtool test that fires it and one that does not; the
dashboard's queries are valid PromQL (promtool parses them); the prod_backend role installs the
tested rules file where it is told, and refuses a directory that does not exist.

What the code exports is read from the registries of a real GPU server app (in front of the Ollama
emulator) and a real backend app after scripted events (requests, a listing with a host down, an NFS
heartbeat), with the suffixes Prometheus gives counters and histograms. A collector that yields a
family only when it has something to say (the model drift) is added from its definition in the source:
``...MetricFamily("gpu_bridge_...")``."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from gpu_bridge.backend import create_app as create_backend
from gpu_bridge.backend.state import EXTENSION as BACKEND
from gpu_bridge.client.base import GpuTransport
from gpu_bridge.errors import GpuHostUnreachable
from gpu_bridge.gpu_server import create_app as create_gpu_server
from gpu_bridge.spool import Liveness

REPO = Path(__file__).resolve().parents[1]
MONITORING = REPO / "monitoring"
# Series Prometheus makes itself for every target: not exported by our code, and allowed.
PROMETHEUS_OWN = {"up"}
# PromQL words that are neither metrics nor followed by "(" (functions and aggregations always are).
PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless",
                "offset", "inf", "nan"}


# --- what the code exports ------------------------------------------------------------------------------
class _Host(GpuTransport):
    """A GPU host in memory, with an NFS worker's heartbeat (so the backend exports those series too)."""

    kind = "fake"
    down = False

    def health(self):
        return {"status": "ok", "ollama": {"reachable": True}}

    def list_models(self):
        if self.down:
            raise GpuHostUnreachable(f"{self.host.label} refused the connection", host=self.host.label)
        return [{"name": "llama3.2:latest", "size": 1, "digest": "aa", "modified_at": "2025-01-01T00:00:00Z"}]

    def start_pull(self, model):
        return {"id": "job-1", "model": model, "state": "queued"}

    def delete_model(self, model):
        return {"deleted": model}

    def get_job(self, job_id):
        return {"id": job_id, "state": "succeeded"}

    def cancel_job(self, job_id):
        return {"id": job_id, "state": "cancelled"}

    def heartbeat(self):
        return Liveness(True, 1.0, 3, {"counter": 3})


def _sample_names(registry) -> set[str]:
    """Every sample name a registry can export, whether or not a series exists yet."""
    suffixes = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count", "_created"),
                "summary": ("_sum", "_count", "_created"), "gauge": ("",), "info": ("_info",)}
    out: set[str] = set()
    for family in registry.collect():
        out |= {family.name + suffix for suffix in suffixes.get(family.type, ("",))}
        out |= {sample.name for sample in family.samples}
    return out


def _families_defined_in_source() -> set[str]:
    names: set[str] = set()
    for path in (REPO / "app" / "src" / "gpu_bridge").rglob("*.py"):
        names |= set(re.findall(r'MetricFamily\(\s*"(gpu_bridge_[a-z0-9_]+)"', path.read_text()))
    return names


@pytest.fixture(scope="module")
def exported(module_emulator, tmp_path_factory) -> set[str]:
    gpu = create_gpu_server({"GPU_BRIDGE_OLLAMA_URL": module_emulator.url, "GPU_BRIDGE_ALLOW_NO_TOKEN": "true"})
    try:
        client = gpu.test_client()
        assert client.get("/api/models").status_code == 200
        assert client.get("/metrics").status_code == 200  # scrape-time collectors run once
        names = _sample_names(gpu.extensions["gpu_bridge"].metrics.registry)
    finally:
        gpu.extensions["gpu_bridge"].close()

    hosts: dict[str, _Host] = {}

    def factory(host, settings):
        hosts[host.name] = _Host(host, settings.client)
        return hosts[host.name]

    db = tmp_path_factory.mktemp("monitoring") / "backend.db"
    backend = create_backend({"GPU_INSTANCE_HOSTS": "gpu-1,gpu-2", "GPU_BRIDGE_DATABASE_URL": f"sqlite:///{db}",
                              "GPU_BRIDGE_CACHE_MAX_AGE": "0"}, transport_factory=factory)
    client = backend.test_client()
    assert client.get("/config/models").status_code == 200
    hosts["gpu-2"].down = True
    assert client.get("/config/models").get_json()["stale"] is True
    assert client.post("/config/pull-model", json={"model": "tinyllama"}).status_code == 202
    assert client.get("/metrics").status_code == 200
    names |= _sample_names(backend.extensions[BACKEND].metrics.registry)
    return names | _families_defined_in_source()


def test_the_scripted_events_export_what_the_rules_are_built_on(exported):
    # Guards the guard: were the registries empty, every check below would have nothing to compare.
    assert {"gpu_bridge_breaker_state", "gpu_bridge_stale_answers_total", "gpu_bridge_ollama_up",
            "gpu_bridge_gpu_memory_used_bytes", "gpu_bridge_nfs_heartbeat_age_seconds",
            "gpu_bridge_fanout_duration_seconds_bucket", "gpu_bridge_backend_pulls"} <= exported


# --- what monitoring/ names -----------------------------------------------------------------------------
def _alerts() -> list[dict]:
    doc = yaml.safe_load((MONITORING / "alerts.yml").read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


def _rule_tests() -> list[tuple[str, dict]]:
    return [(path.name, yaml.safe_load(path.read_text())) for path in sorted((MONITORING / "tests").glob("*.yml"))]


def _dashboard() -> dict:
    return json.loads((MONITORING / "grafana-dashboard.json").read_text())


def _dashboard_exprs() -> list[str]:
    return [t["expr"] for p in _dashboard()["panels"] for t in p.get("targets", []) if t.get("expr")]


def metric_names(promql: str) -> set[str]:
    """The metric names in a PromQL expression: strings, label matchers, ranges and grouping lists
    removed; what is left that is no function call, keyword or number is a metric."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', promql)
    text = re.sub(r"\{[^}]*\}", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    names = set()
    for match in re.finditer(r"(?<![\w$.])([a-zA-Z_:][a-zA-Z0-9_:]*)\b(\s*\()?", text):
        word, call = match.group(1), match.group(2)
        if call or word.lower() in PROMQL_WORDS or re.fullmatch(r"\d+[smhdwy]", word):
            continue
        names.add(word)
    return names


def test_metric_names_are_read_out_of_promql():
    assert metric_names('sum by (host, le) (rate(gpu_bridge_x_bucket{operation="list_models"}[5m]))') == \
        {"gpu_bridge_x_bucket"}
    assert metric_names("a / b > 0.95 or delta(c{state=\"failed\"}[30m]) > 0") == {"a", "b", "c"}
    assert metric_names('up{job="gpu-bridge-gpu"} == 0') == {"up"}
    assert metric_names("histogram_quantile(0.95, sum by (job, le) (rate(d[$__rate_interval])))") == {"d"}


def _unexported(names: set[str], exported: set[str]) -> set[str]:
    return {n for n in names if n not in exported and n not in PROMETHEUS_OWN}


def test_every_alert_names_only_exported_metrics(exported):
    missing = {rule["alert"]: _unexported(metric_names(rule["expr"]), exported) for rule in _alerts()}
    assert not {k: v for k, v in missing.items() if v}, missing


def test_every_rule_test_fixture_uses_only_exported_metrics(exported):
    missing = {}
    for name, doc in _rule_tests():
        for case in doc["tests"]:
            for series in case.get("input_series", []):
                metric = re.match(r"\s*([a-zA-Z_:][a-zA-Z0-9_:]*)", series["series"]).group(1)
                if _unexported({metric}, exported):
                    missing.setdefault(name, set()).add(metric)
    assert not missing, missing


def test_every_dashboard_query_names_only_exported_metrics(exported):
    missing = {expr: _unexported(metric_names(expr), exported) for expr in _dashboard_exprs()}
    assert not {k: v for k, v in missing.items() if v}, missing


def test_a_made_up_metric_would_be_caught(exported):
    assert _unexported(metric_names("rate(gpu_bridge_no_such_thing_total[5m]) > 0"), exported) == \
        {"gpu_bridge_no_such_thing_total"}


# --- the rules' tests and the dashboard's shape -----------------------------------------------------------
def test_every_alert_has_a_test_that_fires_it_and_one_that_does_not():
    fired, quiet = set(), set()
    for _, doc in _rule_tests():
        for case in doc["tests"]:
            for check in case.get("alert_rule_test", []):
                (fired if check.get("exp_alerts") else quiet).add(check["alertname"])
    alerts = {rule["alert"] for rule in _alerts()}
    assert alerts - fired == set(), "alerts no test fires"
    assert alerts - quiet == set(), "alerts no test expects quiet"


def test_every_alert_says_how_bad_and_what_to_do():
    for rule in _alerts():
        assert rule["labels"]["severity"] in ("critical", "warning"), rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], rule["alert"]


def test_the_dashboard_is_importable_and_asks_for_its_datasource():
    dash = _dashboard()
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    assert [v["name"] for v in dash["templating"]["list"] if v["type"] == "datasource"] == ["datasource"]
    for panel in dash["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
            assert panel["targets"] and all(t["expr"] for t in panel["targets"]), panel["title"]
    titles = " ".join(p["title"].lower() for p in dash["panels"])
    for topic in ("breaker", "latency", "stale", "pull", "gpu memory", "drift", "heartbeat"):
        assert topic in titles, topic


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool is missing: scripts/setup-dev installs it")
def test_the_dashboard_queries_are_valid_promql(tmp_path):
    # promtool parses each query as a recording rule ($__rate_interval is Grafana's: a range for promtool).
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:query_{i}", "expr": expr.replace("$__rate_interval", "5m")}
        for i, expr in enumerate(_dashboard_exprs())]}]}
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(yaml.safe_dump(rules))
    done = subprocess.run(["promtool", "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


# --- the role installs the rules ---------------------------------------------------------------------------
def _install_rules(tmp_path: Path, rules_dir: str) -> subprocess.CompletedProcess:
    """prod_backend's monitoring tasks on this machine (local connection, this venv's Python)."""
    playbook = tmp_path / "rules.yml"
    playbook.write_text(yaml.safe_dump([{"name": "Rules", "hosts": "localhost", "gather_facts": False, "tasks": [
        {"name": "Monitoring tasks", "ansible.builtin.include_role": {"name": "prod_backend",
                                                                      "tasks_from": "monitoring"}}]}]))
    env = {**os.environ, "ANSIBLE_CONFIG": str(REPO / "ansible.cfg"), "ANSIBLE_ROLES_PATH": str(REPO / "roles"),
           "ANSIBLE_NOCOLOR": "1"}
    return subprocess.run([str(Path(sys.executable).with_name("ansible-playbook")), "-i", "localhost,", "-c", "local",
                           str(playbook), "-e", f"ansible_python_interpreter={sys.executable}",
                           "-e", f"prod_backend_prometheus_rules_dir={rules_dir}"],
                          capture_output=True, text=True, timeout=120, env=env)


@pytest.mark.skipif(os.geteuid() != 0, reason="the rules file is installed root-owned")
def test_the_role_installs_the_tested_rules_idempotently(tmp_path):
    rules_dir = tmp_path / "rules.d"
    rules_dir.mkdir()
    first = _install_rules(tmp_path, str(rules_dir))
    assert first.returncode == 0 and "changed=1" in first.stdout, first.stdout + first.stderr
    installed = rules_dir / "gpu-bridge.rules.yml"
    assert installed.read_bytes() == (MONITORING / "alerts.yml").read_bytes()
    assert installed.stat().st_mode & 0o777 == 0o644
    again = _install_rules(tmp_path, str(rules_dir))
    assert again.returncode == 0 and "changed=0" in again.stdout, again.stdout + again.stderr


def test_the_role_refuses_a_rules_directory_that_does_not_exist_and_skips_an_empty_one(tmp_path):
    missing = _install_rules(tmp_path, str(tmp_path / "no-such-dir"))
    assert missing.returncode != 0
    assert "is not an existing directory" in missing.stdout, missing.stdout
    nothing = _install_rules(tmp_path, "")
    assert nothing.returncode == 0 and "changed=0" in nothing.stdout and "skipped=" in nothing.stdout, nothing.stdout
