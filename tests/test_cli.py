"""The `gpu-bridge` command's shell: usage errors and the one-line error contract."""

from __future__ import annotations

import subprocess
import sys

import pytest

from gpu_bridge import cli
from gpu_bridge.cli import health
from gpu_bridge.cli.servers import LazyHandler
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
    commands = subactions[0].choices
    assert set(commands) == {"serve-gpu", "serve-backend", "nfs-worker", "nfs-init", "nfs-heartbeat", "models", "jobs",
                             "health"}
    for name, sub in commands.items():
        handler = sub.get_default("handler")
        # A server command's handler is imported only when it runs: the name it gives must exist.
        assert callable(handler.load() if isinstance(handler, LazyHandler) else handler), name


def test_help_loads_neither_the_client_nor_server_code():
    """`gpu-bridge --help` stays fast and a production host never imports server code: building the parser
    imports no HTTP client, Flask app or NFS worker."""
    code = ("import sys\nfrom gpu_bridge.cli import build_parser\nbuild_parser()\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('requests', 'flask', 'gunicorn') or "
            "m.startswith(('gpu_bridge.gpu_server', 'gpu_bridge.backend', 'gpu_bridge.nfs_worker', "
            "'gpu_bridge.client', 'gpu_bridge.cli.target'))))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30, check=True)
    assert r.stdout.strip() == "[]", r.stdout


def test_project_errors_become_one_line(monkeypatch, capsys):
    def boom(args):
        raise InvalidModelName("invalid model name 'a b': use letters, digits and _ - . : /")

    monkeypatch.setattr(health, "run", boom)
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


# --- tokens never go on the command line (issue 14, row 12) -------------------------------------------
SECRET = "s3cret-token-that-must-not-echo"  # noqa: S105 - a test value


@pytest.mark.parametrize("argv", [
    ["--token", SECRET, "models", "list"],
    ["models", "list", "--token", SECRET],
    ["models", "pull", "llama3.2", f"--token={SECRET}"],
    ["jobs", "--token", SECRET],
    ["health", "--url", "http://127.0.0.1:9", "--token", SECRET],
])
def test_token_on_the_command_line_is_refused_with_one_line(argv):
    r = run_cli(*argv)
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1, r.stderr
    assert r.stderr.startswith("gpu-bridge: error: --token is refused")
    for hint in ("--token-file", "GPU_BRIDGE_BACKEND_TOKEN(_FILE)", "GPU_BRIDGE_API_TOKEN(_FILE)"):
        assert hint in r.stderr
    assert SECRET not in r.stderr + r.stdout
    assert "Traceback" not in r.stderr


def test_help_offers_token_file_and_not_token():
    r = run_cli("models", "list", "--help")
    assert "--token-file PATH" in r.stdout
    assert "--token " not in r.stdout.replace("--token-file", "")


@pytest.mark.parametrize(("content", "fragment"), [(None, "cannot read"), ("", "is empty"), (b"\xff\xfe", "UTF-8")])
def test_unusable_token_file_is_one_line(tmp_path, content, fragment):
    path = tmp_path / "token"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    from gpu_bridge.cli.target import read_token_file
    from gpu_bridge.errors import ConfigError

    with pytest.raises(ConfigError) as info:
        read_token_file(str(path))
    assert fragment in info.value.message and "--token-file" in info.value.message


@pytest.mark.integration
def test_token_file_authenticates_against_a_gpu_server(tmp_path):
    """A real GPU server under gunicorn: the token from --token-file is accepted, a wrong one refused,
    and no environment token is needed."""
    import os

    from support.procs import VENV_BIN, start_emulator, start_gunicorn

    token = "cli-token-file-test-token-0123456789abcdef"  # noqa: S105
    emulator = start_emulator()
    server = start_gunicorn("gpu_bridge.gpu_server:create_app()",
                            {"GPU_BRIDGE_API_TOKEN": token, "GPU_BRIDGE_OLLAMA_URL": emulator.url},
                            probe="/api/health", name="gpu-server-cli-token")
    clean = {k: v for k, v in os.environ.items() if not k.startswith("GPU_BRIDGE_") and k != "CREDENTIALS_DIRECTORY"}
    good, bad = tmp_path / "good", tmp_path / "bad"
    good.write_text(token + "\n")
    bad.write_text("not-the-token\n")
    try:
        def cli(*args):
            return subprocess.run([str(VENV_BIN / "gpu-bridge"), *args], capture_output=True, text=True,
                                  timeout=60, check=False, env=clean)

        ok = cli("--json", "models", "list", "--url", server.url, "--token-file", str(good))
        assert ok.returncode == 0, ok.stderr
        assert "models" in ok.stdout
        refused = cli("models", "list", "--url", server.url, "--token-file", str(bad))
        assert refused.returncode == 1
        assert refused.stderr.count("\n") == 1 and "Traceback" not in refused.stderr
        assert "not-the-token" not in refused.stderr
    finally:
        server.stop()
        emulator.stop()
