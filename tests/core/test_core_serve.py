"""One launch path (issue 15): the units (gunicorn -c python:gpu_bridge.gunicorn_conf), the serve commands
and scripts/bench take gunicorn's settings from gpu_bridge.serve, whose defaults are the roles' defaults."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from gpu_bridge import serve
from gpu_bridge.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
GUNICORN = Path(sys.executable).parent / "gunicorn"
APP = "gpu_bridge.gpu_server:create_app()"


def test_defaults_are_one_gthread_worker_without_gunicorns_access_log():
    options = serve.gunicorn_options({})
    assert options["workers"] == 1 and options["worker_class"] == "gthread"
    assert options["accesslog"] is None  # the app's JSON request log only: no query strings, no health checks
    assert options["control_socket_disable"] is True and options["limit_request_line"] == 8190
    assert (options["threads"], options["timeout"], options["graceful_timeout"]) == (8, 60, 30)
    assert "bind" not in options  # systemd's socket (the backend) or gunicorn's default


def test_deployed_values_come_from_the_environment_and_arguments_win():
    env = {"GPU_BRIDGE_GUNICORN_BIND": "127.0.0.1:8002", "GPU_BRIDGE_GUNICORN_THREADS": "3",
           "GPU_BRIDGE_GUNICORN_TIMEOUT": "90", "GPU_BRIDGE_GUNICORN_GRACEFUL_TIMEOUT": "12",
           "GPU_BRIDGE_GUNICORN_PROC_NAME": "gpu-http-server"}
    options = serve.gunicorn_options(env)
    assert options["bind"] == ["127.0.0.1:8002"] and options["threads"] == 3 and options["timeout"] == 90
    assert options["graceful_timeout"] == 12 and options["proc_name"] == "gpu-http-server"
    options = serve.gunicorn_options(env, bind="unix:/run/x.sock", threads=5, timeout=7)
    assert (options["bind"], options["threads"], options["timeout"]) == (["unix:/run/x.sock"], 5, 7)


@pytest.mark.parametrize(("env", "kwargs", "fragment"), [
    ({"GPU_BRIDGE_GUNICORN_THREADS": "many"}, {}, "GPU_BRIDGE_GUNICORN_THREADS"),
    ({"GPU_BRIDGE_GUNICORN_THREADS": "0"}, {}, "GPU_BRIDGE_GUNICORN_THREADS"),
    ({"GPU_BRIDGE_GUNICORN_TIMEOUT": "-1"}, {}, "GPU_BRIDGE_GUNICORN_TIMEOUT"),
    ({"GPU_BRIDGE_GUNICORN_GRACEFUL_TIMEOUT": "12.5"}, {}, "GPU_BRIDGE_GUNICORN_GRACEFUL_TIMEOUT"),
    ({"GPU_BRIDGE_GUNICORN_BIND": "nonsense"}, {}, "nonsense"),
    ({}, {"threads": 0}, "threads"),
])
def test_bad_values_name_what_to_fix(env, kwargs, fragment):
    with pytest.raises(ConfigError, match=fragment):
        serve.gunicorn_options(env, **kwargs)


@pytest.mark.parametrize("role", ["gpu_http_server", "prod_backend"])
def test_the_defaults_are_the_roles_defaults(role):
    """scripts/bench runs the module without GPU_BRIDGE_GUNICORN_*: it measures what the roles deploy."""
    defaults = yaml.safe_load((ROOT / "roles" / role / "defaults" / "main.yml").read_text())
    assert defaults[f"{role}_threads"] == serve.THREADS.default
    assert defaults[f"{role}_timeout"] == serve.TIMEOUT.default
    assert defaults[f"{role}_graceful_timeout"] == serve.GRACEFUL_TIMEOUT.default


def _gunicorn_conf(env: dict) -> subprocess.CompletedProcess:
    # --print-config loads the app too, which wants a token.
    clean = {k: v for k, v in os.environ.items() if not k.startswith("GPU_BRIDGE_")}
    clean["GPU_BRIDGE_API_TOKEN"] = "a-token-for-print-config"  # noqa: S105 - a test value
    return subprocess.run([str(GUNICORN), "-c", "python:gpu_bridge.gunicorn_conf", "--print-config", APP],
                          env={**clean, **env}, capture_output=True, text=True, timeout=60, check=False)


def test_gunicorn_reads_the_module_as_the_units_run_it():
    """Every variable the units set (roles/*/templates/*.service.j2), as strings, as systemd passes them."""
    result = _gunicorn_conf({"GPU_BRIDGE_GUNICORN_BIND": "127.0.0.1:8002", "GPU_BRIDGE_GUNICORN_THREADS": "4",
                             "GPU_BRIDGE_GUNICORN_TIMEOUT": "61", "GPU_BRIDGE_GUNICORN_GRACEFUL_TIMEOUT": "31",
                             "GPU_BRIDGE_GUNICORN_PROC_NAME": "gpu-http-server"})
    assert result.returncode == 0, result.stderr
    printed = dict(line.split("=", 1) for line in result.stdout.splitlines() if "=" in line)
    printed = {k.strip(): v.strip() for k, v in printed.items()}
    assert printed["bind"] == "['127.0.0.1:8002']" and printed["threads"] == "4"
    assert printed["timeout"] == "61" and printed["graceful_timeout"] == "31"
    assert printed["proc_name"] == "gpu-http-server"
    assert printed["accesslog"] == "None" and printed["workers"] == "1" and printed["worker_class"] == "gthread"
    assert printed["control_socket_disable"] == "True" and printed["limit_request_line"] == "8190"


def test_a_bad_value_stops_gunicorn_with_one_line():
    result = _gunicorn_conf({"GPU_BRIDGE_GUNICORN_THREADS": "many"})
    assert result.returncode == 1
    assert result.stderr.strip().count("\n") == 0 and "Traceback" not in result.stderr
    assert "GPU_BRIDGE_GUNICORN_THREADS='many' is not an integer" in result.stderr
