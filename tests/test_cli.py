"""The `gpu-bridge` command's shell: usage errors and the one-line error contract."""

from __future__ import annotations

import subprocess
import sys

import pytest

from gpu_bridge import cli
from gpu_bridge.errors import InvalidModelName


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gpu_bridge.cli", *args], capture_output=True, text=True,
                          timeout=30, check=False)


def test_version():
    r = run_cli("--version")
    assert r.returncode == 0
    assert r.stdout.startswith("gpu-bridge ")


def test_unknown_command_is_a_usage_error():
    r = run_cli("frobnicate")
    assert r.returncode == 2
    assert "invalid choice" in r.stderr
    assert "Traceback" not in r.stderr


def test_every_declared_command_has_a_handler():
    parser = cli.build_parser()
    subactions = [a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction"]
    assert set(subactions[0].choices) == set(cli.HANDLERS)


def test_project_errors_become_one_line(monkeypatch, capsys):
    def boom(args):
        raise InvalidModelName("invalid model name 'a b': use letters, digits and _ - . : /")

    monkeypatch.setattr(cli, "_load", lambda spec: boom)
    assert cli.main(["health"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith("gpu-bridge: error: invalid model name")


@pytest.mark.parametrize("argv", [["models"], ["models", "pull"], ["nfs-heartbeat", "--timeout", "x"]])
def test_bad_arguments_exit_2_without_traceback(argv):
    r = run_cli(*argv)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("argv", [["--json", "models", "list"], ["models", "list", "--json"],
                                  ["--json", "jobs", "ID", "--cancel"], ["health", "--json"], ["--json", "health"]])
def test_json_is_accepted_before_and_after_the_command(argv):
    assert cli.build_parser().parse_args(argv).json is True


@pytest.mark.parametrize("argv", [["models", "list"], ["jobs"], ["health"], ["serve-gpu"]])
def test_without_json_the_output_is_for_people(argv):
    assert cli.build_parser().parse_args(argv).json is False


def test_json_in_the_wrong_place_of_a_server_command_is_still_a_usage_error():
    r = run_cli("serve-gpu", "--json")
    assert r.returncode == 2 and "unrecognized arguments: --json" in r.stderr and "Traceback" not in r.stderr
