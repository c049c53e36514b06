"""The CLI as an operator reads it (issue 20), with real processes: two GPU servers under gunicorn, each
with its Ollama emulator, the backend, and ``gpu-bridge`` as a subprocess.

- every ``gpu-bridge`` command line the README shows runs and succeeds (lab names mapped to the
  test's hosts), and the README's example error is what the CLI prints;
- a host is named once in errors and warnings; a long model name is shown once, with the limit;
- a pull to two hosts says its bytes are across 2 hosts; tables use UTC and say so;
- ``health`` shows what its JSON says; ``models delete`` is idempotent; unknown job ids point to
  ``gpu-bridge jobs``.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
import requests
from conftest import run_cli
from prod_helpers import TOKEN

from gpu_bridge.cli.output import utc_time
from support.procs import emulator_control, free_port

pytestmark = pytest.mark.integration

README = Path(__file__).resolve().parents[2] / "README.md"
LAB_CLI = "docker exec prod-01 /opt/gpu-bridge/venv/bin/gpu-bridge"
README_GPU_URL = "https://gpu-01.example.internal:8001"


@pytest.fixture(scope="module", params=["http"])
def transport(request):
    """The CLI's behaviour does not depend on the channel behind the backend: HTTP only here."""
    return request.param


# --- the README's command lines ------------------------------------------------------------------------------
def readme_command_lines() -> list[str]:
    """Every ``gpu-bridge`` command line in the README: code-block lines (the lab's ``docker exec``
    form included) and backquoted commands in their comments, in README order."""
    found: list[str] = []
    in_block = False
    for line in README.read_text().splitlines():
        if line.startswith("```"):
            in_block = not in_block
            continue
        if not in_block:
            continue
        command, _, comment = line.partition("#")
        command = command.strip().replace(LAB_CLI, "gpu-bridge")
        if command.startswith("gpu-bridge "):
            found.append(command)
        found.extend(m for m in re.findall(r"`(gpu-bridge [^`]+)`", comment))
    return found


def test_the_readme_shows_the_commands_this_test_runs():
    lines = readme_command_lines()
    assert "gpu-bridge --json models list" in lines
    assert "gpu-bridge jobs ID --cancel" in lines
    assert sum(1 for x in lines if x.startswith("gpu-bridge models pull")) >= 3  # Using it + Lab
    assert len(lines) >= 11, lines


def _expect(argv: list[str], r) -> None:
    """What a successful run of each README command prints."""
    words = [a for a in argv if not a.startswith("-")]
    if "--json" in argv:
        json.loads(r.stdout)
    elif words[:2] == ["models", "list"]:
        assert r.stdout.splitlines()[0].split()[:3] == ["NAME", "SIZE", "MODIFIED"], r.stdout
        assert "(UTC)" in r.stdout.splitlines()[0]
    elif words[:2] == ["models", "pull"]:
        assert r.stdout.splitlines()[-1].startswith(f"pulled {words[2]} on "), r.stdout
    elif words[:2] == ["models", "delete"]:
        assert f"deleted {words[2]} on " in r.stdout, r.stdout
    elif words == ["jobs"]:
        assert r.stdout.split()[:5] == ["ID", "STATE", "MODEL", "CREATED", "(UTC)"], r.stdout
    elif words[0] == "jobs":
        assert re.match(r"pull \S+ of \S+: (succeeded|cancelled)", r.stdout), r.stdout
    elif words == ["health"]:
        assert r.stdout.startswith("backend http://127.0.0.1:"), r.stdout
    elif words[:2] == ["models", "ps"]:
        assert r.stdout.split()[:3] == ["HOST", "NAME", "SIZE"] and "EXPIRES (UTC)" in r.stdout, r.stdout
    elif words[:2] in (["models", "load"], ["models", "unload"]):
        assert r.stdout.startswith(f"{words[1]}ed {words[2]} on "), r.stdout
    else:  # pragma: no cover - a new README command needs an expectation here
        raise AssertionError(f"no expectation for README command {argv}")


def test_every_command_line_the_readme_shows_runs(gpu_side, backend):
    for emu in gpu_side.emulators:
        emulator_control(emu, "config", {"pull_speed": 2e9})
    gpu = gpu_side.servers["127.0.0.1"]
    env = {"GPU_BRIDGE_URL": backend.url, "GPU_BRIDGE_API_TOKEN": TOKEN}
    ran = []
    for line in readme_command_lines():
        argv = shlex.split(line)[1:]
        # The lab's names → this test's hosts.
        argv = [gpu.url if a == README_GPU_URL else "127.0.0.1" if a == "gpu-01" else a for a in argv]
        if "ID" in argv:
            pulls = requests.get(backend.url + "/config/pulls", timeout=10).json()["pulls"]
            argv[argv.index("ID")] = pulls[0]["id"]
        r = run_cli(*argv, env=env, timeout=90)
        assert r.returncode == 0, f"README: {line}\n{r.stdout}{r.stderr}"
        assert r.stderr == "", f"README: {line}\n{r.stderr}"
        _expect(argv, r)
        ran.append(line)
    assert ran == readme_command_lines()


def test_the_readme_error_example_is_what_the_cli_prints():
    text = README.read_text()
    example = re.search(r"`(gpu-bridge: error: cannot reach the backend at (\S+) [^`]*)`", text)
    assert example, "README lost its example error line"
    dead = f"http://127.0.0.1:{free_port()}"
    r = run_cli("models", "list", env={"GPU_BRIDGE_URL": dead})
    assert r.returncode == 1
    assert r.stderr == example.group(1).replace(example.group(2), dead) + "\n"


# --- --json in both places -------------------------------------------------------------------------------------
@pytest.mark.parametrize("command", [["models", "list"], ["jobs"], ["health"]])
def test_json_before_or_after_the_command_is_the_same(gpu_side, backend, command):
    before = run_cli("--json", *command, "--url", backend.url)
    after = run_cli(*command, "--url", backend.url, "--json")
    assert before.returncode == after.returncode == 0, before.stderr + after.stderr
    assert steady(json.loads(before.stdout)) == steady(json.loads(after.stdout))


VOLATILE = {"latency_ms", "last_ok_at", "uptime_seconds", "fetched_at"}


def steady(doc):
    """A JSON answer without the figures that move between two calls (latencies, times)."""
    if isinstance(doc, dict):
        return {k: steady(v) for k, v in doc.items() if k not in VOLATILE}
    if isinstance(doc, list):
        return [steady(v) for v in doc]
    return doc


# --- hosts named once ---------------------------------------------------------------------------------------------
def test_a_host_is_named_once_in_warnings_and_errors(gpu_side, backends):
    a = gpu_side.labels[0]
    dead = gpu_side.dead_entry()
    both = backends(gpu_side.backend_env([a, dead]))
    r = run_cli("models", "list", "--url", both.url)
    assert r.returncode == 0
    warning = next(line for line in r.stderr.splitlines() if line.startswith("gpu-bridge: warning:"))
    assert warning.count(dead) == 1 and "refused" in warning, warning

    only_dead = backends(gpu_side.backend_env([dead]))
    r = run_cli("models", "pull", "tinyllama", "--url", only_dead.url)
    assert r.returncode == 1 and r.stderr.count("\n") == 1
    assert "failed on every GPU host" in r.stderr and r.stderr.count(dead) == 1, r.stderr


def test_a_failed_pull_names_each_host_once(gpu_side, backend):
    r = run_cli("models", "pull", "doesnotexist", "--url", backend.url, timeout=60)
    assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
    assert r.stderr.startswith("gpu-bridge: error: pull of doesnotexist:latest failed on ")
    for label in gpu_side.labels:
        assert r.stderr.count(label) == 1, r.stderr


# --- long names -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("action", ["pull", "delete"])
def test_a_400_character_name_says_the_limit_and_shows_the_name_once(gpu_side, backend, action):
    name = "a" * 400
    r = run_cli("models", action, name, "--url", backend.url)
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    assert r.stderr == ("gpu-bridge: error: invalid model name 'aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa'... "
                        "(400 characters): the model part has 400 characters: at most 80 are allowed\n")
    # The backend's JSON answer says the same to API callers.
    body = requests.post(backend.url + "/config/pull-model", json={"model": name}, timeout=10).json()
    assert body["code"] == "invalid_model_name" and "at most 80 are allowed" in body["error"]
    assert body["error"].count("a" * 40) == 1


# --- pull progress over two hosts ------------------------------------------------------------------------------
def test_a_pull_to_two_hosts_says_its_bytes_are_across_2_hosts(gpu_side, backend):
    for emu in gpu_side.emulators:  # ~1 s per pull: several progress lines
        emulator_control(emu, "config", {"pull_speed": 60e6})
    r = run_cli("models", "pull", "tinyllama", "--url", backend.url, timeout=90)
    assert r.returncode == 0, r.stderr
    with_bytes = [line for line in r.stdout.splitlines() if "% (" in line]
    assert with_bytes, r.stdout
    # Early lines may know one host's total only (the other has not reported its layers yet).
    assert all(re.search(r"\(\S+ \w?B of \S+ \w?B across 2 hosts\)", line) for line in with_bytes), r.stdout
    assert "(127.5 MB of 127.5 MB across 2 hosts)" in with_bytes[-1], r.stdout  # tinyllama is 63.8 MB
    assert r.stdout.splitlines()[-1] == f"pulled tinyllama:latest on {', '.join(gpu_side.labels)}"

    r = run_cli("models", "pull", "smollm:135m", "--host", "127.0.0.1", "--url", backend.url, timeout=90)
    assert r.returncode == 0, r.stderr
    with_bytes = [line for line in r.stdout.splitlines() if "% (" in line]
    assert with_bytes and not any("across" in line for line in with_bytes), r.stdout


# --- one time convention -------------------------------------------------------------------------------------------
def test_models_and_jobs_show_utc_and_say_so(gpu_side, backend):
    emulator_control(gpu_side.emulators[0], "config", {"tz_offset": "-07:00"})
    listing = json.loads(run_cli("--json", "models", "list", "--url", backend.url).stdout)
    model = next(m for m in listing["models"] if m["modified_at"].endswith("-07:00"))
    r = run_cli("models", "list", "--url", backend.url)
    assert r.stdout.splitlines()[0].split()[:4] == ["NAME", "SIZE", "MODIFIED", "(UTC)"]
    row = next(line for line in r.stdout.splitlines() if line.startswith(model["name"] + " "))
    local = model["modified_at"][:19].replace("T", " ")
    assert utc_time(model["modified_at"]) in row and local not in row, (model, row)

    r = run_cli("models", "pull", "smollm:135m", "--url", backend.url, timeout=90)
    assert r.returncode == 0, r.stderr
    pulls = json.loads(run_cli("jobs", "--json", "--url", backend.url).stdout)["pulls"]
    r = run_cli("jobs", "--url", backend.url)
    assert r.stdout.split()[:5] == ["ID", "STATE", "MODEL", "CREATED", "(UTC)"]
    row = next(line for line in r.stdout.splitlines() if line.startswith(pulls[0]["id"]))
    assert utc_time(pulls[0]["created_at"]) in row
    assert re.search(r" \d{4}-\d\d-\d\d \d\d:\d\d:\d\d ", row), row


def test_utc_time_reads_every_form_the_servers_send():
    assert utc_time("2025-05-05T00:37:44.123456789-07:00") == "2025-05-05 07:37:44"  # Ollama: ns, local offset
    assert utc_time("2025-05-05T07:37:44Z") == "2025-05-05 07:37:44"  # the backend
    assert utc_time("2025-05-05T07:37:44") == "2025-05-05 07:37:44"
    assert utc_time("yesterday") == "yesterday" and utc_time(None) == ""


# --- health: the table says what the JSON says ----------------------------------------------------------------------
def test_the_health_table_shows_each_hosts_status_and_reason(gpu_side, backend):
    doc = json.loads(run_cli("--json", "health", "--url", backend.url).stdout)
    r = run_cli("health", "--url", backend.url)
    assert r.returncode == (0 if doc["status"] == "ok" else 1)
    rows = {line.split()[0]: line for line in r.stdout.splitlines()[3:]}
    assert set(rows) == set(doc["gpu_hosts"]), r.stdout
    for label, h in doc["gpu_hosts"].items():
        state = rows[label].split()[1]
        if not h["ok"]:
            assert state == "FAILING"
        else:
            assert state == h["status"], (h, rows[label])
        if h.get("status") == "degraded":
            assert h["reason"] and h["reason"] in rows[label], (h, rows[label])
    # Without a GPU (CI, this machine) every GPU server says degraded, "no GPU visible (...)", and so must the table.
    for name, label in zip(gpu_side.names, gpu_side.labels, strict=True):
        own = requests.get(gpu_side.servers[name].url + "/api/health", timeout=10).json()
        assert rows[label].split()[1] == own["status"], (own, rows[label])
        assert own["gpu"]["available"] or "no GPU visible" in rows[label], (own, rows[label])


# --- delete is idempotent ------------------------------------------------------------------------------------------
def test_delete_where_one_host_already_lacks_the_model_exits_0(gpu_side, backend):
    a, b = gpu_side.labels
    emulator_control(gpu_side.emulator("127.0.0.2"), "config", {"installed": ["llama3.2:latest"]})
    r = run_cli("models", "delete", "qwen2.5:0.5b", "--url", backend.url)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [f"deleted qwen2.5:0.5b on {a}", f"qwen2.5:0.5b was already absent on {b}"]
    assert r.stderr == ""
    # Gone everywhere now; a second delete finds it nowhere: that is a misspelt name as far as the CLI knows.
    r = run_cli("models", "delete", "qwen2.5:0.5b", "--url", backend.url)
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr == (f"gpu-bridge: error: deleting qwen2.5:0.5b failed: it is not installed on {a}, {b}: check "
                        "the name with `gpu-bridge models list`\n")
    r = run_cli("--json", "models", "delete", "llama3.2:latest", "--url", backend.url)
    assert r.returncode == 0 and set(json.loads(r.stdout)["results"]) == {a, b}


def test_delete_with_a_host_down_still_fails(gpu_side, backends):
    a = gpu_side.labels[0]
    dead = gpu_side.dead_entry()
    backend = backends(gpu_side.backend_env([a, dead]))
    r = run_cli("models", "delete", "qwen2.5:0.5b", "--url", backend.url)
    assert r.returncode == 1
    assert r.stdout == f"deleted qwen2.5:0.5b on {a}\n"
    assert r.stderr.startswith(f"gpu-bridge: error: deleting qwen2.5:0.5b failed on {dead} refused the connection")
    assert r.stderr.count("\n") == 1 and r.stderr.count(dead) == 1


def test_delete_straight_at_a_gpu_server(gpu_side):
    gpu = gpu_side.servers["127.0.0.1"]
    env = {"GPU_BRIDGE_API_TOKEN": TOKEN}
    r = run_cli("models", "delete", "qwen2.5:0.5b", "--url", gpu.url, env=env)
    assert r.returncode == 0 and r.stdout == f"deleted qwen2.5:0.5b on {gpu_side.labels[0]}\n", r.stderr
    r = run_cli("models", "delete", "qwen2.5:0.5b", "--url", gpu.url, env=env)
    assert r.returncode == 1 and "it is not installed on " in r.stderr and r.stderr.count("\n") == 1


# --- unknown job ids --------------------------------------------------------------------------------------------------
def test_an_unknown_job_id_points_to_gpu_bridge_jobs(gpu_side, backend):
    for argv in (["jobs", "nope"], ["jobs", "nope", "--cancel"]):
        r = run_cli(*argv, "--url", backend.url)
        assert r.returncode == 1 and r.stderr.count("\n") == 1
        assert r.stderr == ("gpu-bridge: error: no pull with id 'nope': see `gpu-bridge jobs` (GET /config/pulls) "
                            "for the pulls this backend knows\n")
    gpu = gpu_side.servers["127.0.0.1"]
    r = run_cli("jobs", "nope", "--url", gpu.url, env={"GPU_BRIDGE_API_TOKEN": TOKEN})
    assert r.returncode == 1 and r.stderr.count("\n") == 1
    assert r.stderr.endswith(f": see `gpu-bridge jobs --url {gpu.url}` for the jobs it knows\n"), r.stderr
