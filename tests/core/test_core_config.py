"""config.py: environment → settings, defaults, and errors that name the variable to fix."""

from __future__ import annotations

import os

import pytest

from gpu_bridge import config
from gpu_bridge.config import GpuServerSettings
from gpu_bridge.errors import ConfigError


def test_gpu_server_defaults():
    s = GpuServerSettings.from_env({})
    assert s.ollama_url == "http://127.0.0.1:11434"
    assert s.api_token is None and s.allow_no_token is False
    assert s.allowed_registries == ("registry.ollama.ai", "hf.co")
    assert (s.max_concurrent_pulls, s.max_queued_pulls, s.rate_limit_per_minute) == (2, 16, 60)
    assert s.pull_stall_timeout == 300.0
    assert s.min_free_bytes == 10 * 1024**3
    assert s.metrics_public is False


def test_gpu_server_values_are_parsed():
    s = GpuServerSettings.from_env({
        "GPU_BRIDGE_OLLAMA_URL": "http://10.0.0.5:11434/", "GPU_BRIDGE_API_TOKEN": "  tok  ",
        "GPU_BRIDGE_ALLOWED_REGISTRIES": "registry.ollama.ai, hf.co ,, my.reg:5000",
        "GPU_BRIDGE_PULL_STALL_TIMEOUT": "1.5", "GPU_BRIDGE_MAX_CONCURRENT_PULLS": "4",
        "GPU_BRIDGE_RATE_LIMIT_PER_MINUTE": "0", "GPU_BRIDGE_MIN_FREE_GB": "0.5",
        "GPU_BRIDGE_METRICS_PUBLIC": "YES", "GPU_BRIDGE_ALLOW_NO_TOKEN": "off",
    })
    assert s.ollama_url == "http://10.0.0.5:11434"  # trailing slash dropped
    assert s.api_token == "tok"
    assert s.allowed_registries == ("registry.ollama.ai", "hf.co", "my.reg:5000")
    assert s.pull_stall_timeout == 1.5 and s.max_concurrent_pulls == 4 and s.rate_limit_per_minute == 0
    assert s.min_free_bytes == 512 * 1024**2
    assert s.metrics_public is True and s.allow_no_token is False


def test_blank_values_mean_default():
    assert GpuServerSettings.from_env({"GPU_BRIDGE_MAX_QUEUED_PULLS": "  "}).max_queued_pulls == 16


@pytest.mark.parametrize(("name", "value", "fragment"), [
    ("GPU_BRIDGE_MAX_CONCURRENT_PULLS", "two", "is not an integer"),
    ("GPU_BRIDGE_MAX_CONCURRENT_PULLS", "0", "must be >= 1"),
    ("GPU_BRIDGE_MAX_QUEUED_PULLS", "-1", "must be >= 0"),
    ("GPU_BRIDGE_PULL_STALL_TIMEOUT", "nan", "must be a number"),
    ("GPU_BRIDGE_PULL_STALL_TIMEOUT", "0", "must be a number >= 0.1"),
    ("GPU_BRIDGE_OLLAMA_CONNECT_TIMEOUT", "soon", "is not a number"),
    ("GPU_BRIDGE_METRICS_PUBLIC", "maybe", "is not a boolean"),
    ("GPU_BRIDGE_MAX_BODY_BYTES", "100", "must be >= 1024"),
])
def test_malformed_values_name_the_variable(name, value, fragment):
    with pytest.raises(ConfigError) as info:
        GpuServerSettings.from_env({name: value})
    assert name in info.value.message
    assert fragment in info.value.message


def test_token_file_wins_and_is_stripped(tmp_path):
    secret = tmp_path / "api-token"
    secret.write_text("from-file\n")
    s = GpuServerSettings.from_env({"GPU_BRIDGE_API_TOKEN_FILE": str(secret), "GPU_BRIDGE_API_TOKEN": "from-env"})
    assert s.api_token == "from-file"


def test_systemd_credential_is_read(tmp_path):
    (tmp_path / "api-token").write_text("from-credential")
    assert GpuServerSettings.from_env({"CREDENTIALS_DIRECTORY": str(tmp_path)}).api_token == "from-credential"


@pytest.mark.parametrize(("content", "fragment"), [(None, "cannot read"), ("", "is empty"), (b"\xff\xfe", "UTF-8")])
def test_bad_token_files_are_config_errors(tmp_path, content, fragment):
    path = tmp_path / "token"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    with pytest.raises(ConfigError) as info:
        GpuServerSettings.from_env({"GPU_BRIDGE_API_TOKEN_FILE": str(path)})
    assert "GPU_BRIDGE_API_TOKEN_FILE" in info.value.message and fragment in info.value.message


def test_from_env_none_reads_os_environ(monkeypatch):
    monkeypatch.setenv("GPU_BRIDGE_MAX_QUEUED_PULLS", "3")
    assert GpuServerSettings.from_env().max_queued_pulls == 3
    assert os.environ["GPU_BRIDGE_MAX_QUEUED_PULLS"] == "3"


@pytest.mark.parametrize(("entry", "expected"), [
    ("gpu1", ("gpu1", 8001)), ("gpu1:9000", ("gpu1", 9000)), ("[fd00::1]:9000", ("fd00::1", 9000)),
    ("fd00::1", ("fd00::1", 8001)),
])
def test_split_host_port(entry, expected):
    assert config.split_host_port(entry, 8001) == expected


@pytest.mark.parametrize("entry", [":9000", "gpu1:x", "gpu1:70000"])
def test_split_host_port_errors(entry):
    with pytest.raises(ConfigError):
        config.split_host_port(entry, 8001)


def test_gpu_hosts_are_deduplicated_and_get_the_default_port():
    hosts = config.parse_gpu_hosts({"GPU_INSTANCE_HOSTS": "gpu1, gpu2:9000, gpu1:8001", "GPU_BRIDGE_GPU_PORT": "8001"})
    assert [h.label for h in hosts] == ["gpu1:8001", "gpu2:9000"]
    assert hosts[0].base_url == "http://gpu1:8001"


def test_client_transport_must_be_known():
    with pytest.raises(ConfigError) as info:
        config.ClientSettings.from_env({"GPU_BRIDGE_TRANSPORT": "carrier-pigeon"})
    assert "GPU_BRIDGE_TRANSPORT" in info.value.message


@pytest.mark.parametrize("cls", [config.GpuServerSettings, config.ClientSettings, config.NfsSettings,
                                 config.RetentionSettings])
def test_an_empty_environment_gives_the_dataclass_defaults(cls):
    """from_env and the dataclass take their defaults from the same Setting: they cannot differ."""
    assert cls.from_env({}) == cls()


def test_every_setting_is_in_the_table_once():
    names = [s.env for s in config.SETTINGS]
    assert len(names) == len(set(names))
    assert {"GPU_BRIDGE_AUDIT_RETENTION_DAYS", "GPU_BRIDGE_PULL_RETENTION_DAYS", "GPU_BRIDGE_MIN_FREE_GB"} <= set(names)


def test_retention_defaults_and_zero():
    assert config.RetentionSettings.from_env({}) == config.RetentionSettings(audit_days=90, pull_days=30)
    zero = config.RetentionSettings.from_env({"GPU_BRIDGE_AUDIT_RETENTION_DAYS": "0",
                                              "GPU_BRIDGE_PULL_RETENTION_DAYS": " 0 "})
    assert (zero.audit_days, zero.pull_days) == (0, 0)


@pytest.mark.parametrize(("name", "value", "fragment"), [
    ("GPU_BRIDGE_AUDIT_RETENTION_DAYS", "-1", "must be >= 0"),
    ("GPU_BRIDGE_AUDIT_RETENTION_DAYS", "90d", "is not an integer"),
    ("GPU_BRIDGE_PULL_RETENTION_DAYS", "1.5", "is not an integer"),
    ("GPU_BRIDGE_TRANSPORT", "NFSv4", "must be http or nfs"),
    ("GPU_BRIDGE_GPU_SCHEME", "ftp", "must be http or https"),
])
def test_backend_settings_errors_name_the_variable(name, value, fragment):
    with pytest.raises(ConfigError) as info:
        config.BackendSettings.from_env({name: value})
    assert info.value.message.startswith(f"{name}=") and fragment in info.value.message


def test_transport_is_case_folded_and_the_url_slash_dropped():
    assert config.ClientSettings.from_env({"GPU_BRIDGE_TRANSPORT": "NFS"}).transport == "nfs"
    assert GpuServerSettings.from_env({"GPU_BRIDGE_OLLAMA_URL": "http://o:1//"}).ollama_url == "http://o:1"


def test_nfs_host_id_defaults_to_the_host_name(monkeypatch):
    monkeypatch.setattr(config.socket, "gethostname", lambda: "gpu-07")
    assert config.NfsSettings.from_env({}).host_id == "gpu-07"
    assert config.NfsSettings.from_env({"GPU_BRIDGE_NFS_HOST_ID": "gpu-01"}).host_id == "gpu-01"
