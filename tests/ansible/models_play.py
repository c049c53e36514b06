"""Run the real playbooks/models.yml (role gpu_models, module gpu_bridge_models) against GPU hosts on
loopback: each host is an Ollama emulator plus a GPU server under gunicorn, reached by Ansible's local
connection with this venv's Python (the module imports gpu_bridge, as on a deployed host)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import requests

from support.procs import REPO, ServerProcess, emulator_control, start_emulator, start_gunicorn

TOKEN = "ansible-models-test-token-0123456789abcdef"
PLAYBOOK = REPO / "playbooks" / "models.yml"
MODULE_TASK = "gpu_models : Keep the declared Ollama models on this host"
VENV_PYTHON = sys.executable


@dataclass
class GpuHost:
    """One GPU host: its emulator (the Ollama) and its GPU server (what the module talks to)."""

    name: str
    emulator: ServerProcess
    server: ServerProcess

    def reset(self) -> None:
        emulator_control(self.emulator, "reset")

    def stats(self) -> dict:
        return emulator_control(self.emulator, "stats")

    def config(self, **knobs: object) -> None:
        emulator_control(self.emulator, "config", knobs)

    def installed(self) -> dict[str, str]:
        """name -> digest, as Ollama lists them."""
        tags = requests.get(f"{self.emulator.url}/api/tags", timeout=5).json()["models"]
        return {m["name"]: m["digest"] for m in tags}

    def resident(self) -> set[str]:
        return {m["name"] for m in requests.get(f"{self.emulator.url}/api/ps", timeout=5).json()["models"]}

    def publish(self, model: str) -> dict:
        """A new build of ``model`` in the registry: the next pull of that tag gets a new digest."""
        return emulator_control(self.emulator, "publish", {"model": model})

    def unload(self, model: str) -> None:
        r = requests.post(f"{self.emulator.url}/api/generate", json={"model": model, "keep_alive": 0}, timeout=5)
        r.raise_for_status()

    def stop(self) -> None:
        self.server.stop()
        self.emulator.stop()


def start_gpu_host(name: str) -> GpuHost:
    emulator = start_emulator()
    try:
        server = start_gunicorn("gpu_bridge.gpu_server:create_app()",
                                {"GPU_BRIDGE_API_TOKEN": TOKEN, "GPU_BRIDGE_OLLAMA_URL": emulator.url,
                                 "GPU_BRIDGE_RATE_LIMIT_PER_MINUTE": "0"},
                                probe="/api/health", name=f"gpu-server-{name}")
    except BaseException:
        emulator.stop()
        raise
    return GpuHost(name, emulator, server)


@dataclass
class PlayRun:
    """One ansible-playbook run: its exit status, output, and (JSON callback) the parsed document."""

    rc: int
    output: str
    data: dict | None

    def module(self, host: str) -> dict:
        """The gpu_bridge_models result of ``host`` (plan, drift, results, msg when it failed)."""
        for play in self.plays:
            for task in play["tasks"]:
                if task["task"]["name"] == MODULE_TASK and host in task["hosts"]:
                    return task["hosts"][host]
        raise AssertionError(f"the module did not run on {host}:\n{self.output[-3000:]}")

    def ran_on(self, host: str) -> bool:
        return any(task["task"]["name"] == MODULE_TASK and host in task["hosts"]
                   for play in self.plays for task in play["tasks"])

    @property
    def plays(self) -> list[dict]:
        assert self.data is not None, "a text run has no parsed plays"
        return self.data["plays"]

    def batches(self) -> list[list[str]]:
        """The hosts the module ran on, one list per serial batch (each batch is a play in the output)."""
        return [sorted(host for task in play["tasks"] if task["task"]["name"] == MODULE_TASK
                       for host in task["hosts"]) for play in self.plays]

    def batch_times(self) -> list[tuple[str, str]]:
        """(start, end) of each serial batch, ISO 8601 UTC (they compare as strings)."""
        return [(play["play"]["duration"]["start"], play["play"]["duration"]["end"]) for play in self.plays]

    def failure(self, host: str) -> str:
        """The message of the task that failed on ``host`` (the argument-spec check or the module)."""
        for play in self.plays:
            for task in play["tasks"]:
                result = task["hosts"].get(host, {})
                if result.get("failed") or result.get("unreachable"):
                    return result["msg"]
        raise AssertionError(f"nothing failed on {host}:\n{self.output[-3000:]}")

    def why(self) -> str:
        """For an assertion message: each failed host's message, else the end of the output."""
        if self.data is None:
            return self.output[-3000:]
        failed = {host: self.failure(host) for host, counts in self.data["stats"].items()
                  if counts["failures"] or counts["unreachable"]}
        return "; ".join(f"{host}: {msg}" for host, msg in failed.items()) or self.output[-3000:]

    def changed(self, host: str) -> int:
        assert self.data is not None
        return self.data["stats"][host]["changed"]

    def failures(self, host: str) -> int:
        assert self.data is not None
        return self.data["stats"][host]["failures"]


def run_models(tmp_path: Path, hosts: list[GpuHost], models: list | None, *, check: bool = False,
               diff: bool = False, extra: dict | None = None, prune: bool | None = None,
               host_vars: dict[str, dict] | None = None, text: bool = False) -> PlayRun:
    """ansible-playbook playbooks/models.yml on ``hosts`` (in this order: the first is the canary), with
    ``models`` as the gpu_servers group's gpu_bridge_models (None: not declared at all)."""
    token_file = tmp_path / "api-token"
    token_file.write_text(TOKEN + "\n")
    group_vars: dict = {"ansible_connection": "local", "ansible_python_interpreter": VENV_PYTHON,
                        # play's become: true would need sudo here; the test runs as the user it is
                        "ansible_become": False,
                        "gpu_models_python": VENV_PYTHON, "gpu_models_token_file": str(token_file),
                        "gpu_models_timeout": 60}
    if models is not None:
        group_vars["gpu_bridge_models"] = models
    if prune is not None:
        group_vars["gpu_bridge_models_prune"] = prune
    inventory = {"all": {"children": {"gpu_servers": {
        "hosts": {h.name: {"gpu_models_url": h.server.url, **(host_vars or {}).get(h.name, {})} for h in hosts},
        "vars": group_vars}}}}
    inventory_file = tmp_path / "inventory.yml"
    inventory_file.write_text(json.dumps(inventory))  # JSON is YAML
    env = {**os.environ, "ANSIBLE_CONFIG": str(REPO / "ansible.cfg"),
           "ANSIBLE_LOCAL_TEMP": str(tmp_path / "ansible-local"),
           "ANSIBLE_REMOTE_TEMP": str(tmp_path / "ansible-remote")}
    return run_playbook(str(inventory_file), env, check=check, diff=diff, extra=extra, text=text)


def run_playbook(inventory: str, env: dict[str, str], *, check: bool = False, diff: bool = False,
                 extra: dict | None = None, text: bool = False, timeout: float = 100) -> PlayRun:
    """playbooks/models.yml with ``inventory``: parsed from the JSON callback, or as text (--diff's
    output). Also used by the molecule default scenario against its containers."""
    argv = [str(Path(VENV_PYTHON).parent / "ansible-playbook"), "-i", inventory, str(PLAYBOOK)]
    if check:
        argv.append("--check")
    if diff:
        argv.append("--diff")
    if extra:
        argv += ["-e", json.dumps(extra)]
    env = {**env, "ANSIBLE_NOCOLOR": "1"}
    env.pop("ANSIBLE_FORCE_COLOR", None)
    if not text:
        # Only the JSON on stdout: this list replaces the configured one (molecule enables
        # profile_tasks, which would print its timings into the document); an empty list is refused.
        env.update(ANSIBLE_STDOUT_CALLBACK="ansible.posix.json", ANSIBLE_CALLBACKS_ENABLED="ansible.posix.json")
    done = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    output = done.stdout + done.stderr
    data = None
    if not text:
        try:
            data = json.loads(done.stdout)
        except ValueError:
            raise AssertionError(f"ansible-playbook wrote no JSON (exit {done.returncode}):\n"
                                 f"{output[-3000:]}") from None
    return PlayRun(done.returncode, output, data)
